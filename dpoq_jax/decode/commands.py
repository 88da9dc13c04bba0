r"""`dpoq generate`: prompts -> sampled, greedy, beam or reward-guided responses as JSON lines.

    dpoq generate --model DIR --prompts prompts.jsonl --mode beam --num-beams 5 --out out.jsonl
    dpoq generate --model WORKDIR --tokenizer synthetic --synthetic error_injection --n 16 \
        --mode guided --reference SFT_WORKDIR --beta 0.1 --out out.jsonl

A model is a Hugging Face directory (config.json + safetensors) or a training run's workdir (its
newest orbax checkpoint). Also used by `dpoq score` (dpoq_jax/analysis/commands.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from dpoq_jax import paths
from dpoq_jax.data import chat
from dpoq_jax.data.errors import ErrorPolicy, reports_user_errors
from dpoq_jax.data.jsonl import check_fields, iter_json_lines

log = logging.getLogger(__name__)


def load_model(path: str, dtype: str | None = None, flag: str = "--model") -> Any:
    """Decoder from a Hugging Face directory or a run workdir / its checkpoints directory; errors name
    the command-line `flag` the path came from."""
    import jax
    from flax import nnx

    from dpoq_jax.models import hf
    from dpoq_jax.models.config import ModelConfig

    if not paths.isdir(path):
        raise FileNotFoundError(f"{flag} {path}: not a directory")
    kw: dict[str, Any] = {} if dtype is None else {"dtype": jax.numpy.dtype(dtype)}
    is_workdir = paths.isdir(paths.join(path, "checkpoints"))  # a run workdir also has a config.json
    if not is_workdir and paths.isfile(paths.join(path, "config.json")):
        try:
            model, _ = hf.load_hf(path, **kw)
        except KeyError as e:  # tensors missing from the safetensors files
            raise ValueError(f"{flag} {path}: {e.args[0]}") from None
        except (OSError, ValueError) as e:
            raise type(e)(f"{flag} {path}: {e}") from None
        return model
    from dpoq_jax.train.checkpoint import DamagedCheckpoint, RunCheckpoints

    ckpt_dir = paths.join(path, "checkpoints") if is_workdir else path
    ckpts = RunCheckpoints(paths.absolute(ckpt_dir), every_steps=1, keep=1, async_save=False)
    steps = sorted(ckpts.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(
            f"{flag} {path}: neither a Hugging Face directory (config.json) nor a run "
            f"workdir with a complete checkpoint under {ckpt_dir}"
        )
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    damaged = []
    try:
        # the newest step that passes the integrity checks; a damaged newer one is named and skipped
        # (read-only: unlike a training resume, nothing is moved aside here)
        for step in steps:
            try:
                mcfg = ModelConfig.from_dict(ckpts.read_json(step, "model_config"))
                graphdef, abstract, rest = hf.abstract_decoder(mcfg, **kw)
                params = ckpts.restore_params(step, abstract, jax.tree.map(lambda _: dev, abstract))
            except DamagedCheckpoint as e:
                damaged.append(f"step {step}: {e}")
                continue
            except Exception as e:  # noqa: BLE001  (orbax/JSON errors of a cut or edited step)
                first = (str(e).splitlines() or [type(e).__name__])[0][:200]
                damaged.append(f"step {step} cannot be read ({first})")
                continue
            for why in damaged:
                log.warning("%s %s: checkpoint %s; using step %d", flag, path, why, step)
            return nnx.merge(graphdef, params, rest)
    finally:
        ckpts.close()
    raise ValueError(f"{flag} {path}: no intact checkpoint under {ckpt_dir} (newest, {damaged[0]})")


def context_length(*models: Any) -> int | None:
    """Positions the models were built for (the smallest max_position_embeddings); None if unknown."""
    sizes = [m.cfg.max_position_embeddings for m in models if m is not None and hasattr(m, "cfg")]
    return min(sizes) if sizes else None


def load_tokenizer(spec: str | None, model_path: str, flag: str = "--model") -> Any:
    """`synthetic`: the synthetic tasks' tokenizer; a directory: its HF tokenizer; None: the one that
    goes with the model (its directory's tokenizer files, or what its training run used)."""
    from dpoq_jax.models import hf

    if spec is None:
        if not paths.isdir(model_path):
            raise FileNotFoundError(f"{flag} {model_path}: not a directory")
        spec = hf.find_tokenizer(model_path)
        if spec is None:
            raise FileNotFoundError(
                f"{flag} {model_path}: no tokenizer found with the model; pass --tokenizer DIR or synthetic"
            )
        flag = f"tokenizer of {flag}"
    else:
        flag = "--tokenizer"
    if spec == "synthetic":
        from dpoq_jax.data.synthetic import SyntheticTokenizer

        return SyntheticTokenizer()
    if not hf.has_tokenizer(spec):
        what = "not a directory" if not paths.isdir(spec) else "no tokenizer files there"
        raise FileNotFoundError(f"{flag} {spec}: {what} (expected 'synthetic' or a tokenizer directory)")
    return hf.load_tokenizer(spec)


def read_prompts(path: str) -> list[dict[str, Any]]:
    """Prompts from .jsonl ({"prompt": ..., other keys kept as meta}) or text (one per non-empty line).
    A chat prompt is a list of messages under "prompt" (or "messages"); it is rendered with the chat
    template and the generation prompt (data/chat.py)."""
    if path.endswith((".jsonl", ".json")):
        out = []
        for line, rec in iter_json_lines(path, ErrorPolicy("fail")):
            if chat.is_conversational(rec):
                key = "prompt" if "prompt" in rec else "messages"
                rec = {**rec, "prompt": chat.check_messages(rec[key], file=path, line=line, key=key)}
            else:
                check_fields(rec, ("prompt",), (), file=path, line=line)
            out.append({**rec, "where": f"{path}:{line}"})
    else:
        with paths.open(path, encoding="utf-8") as f:
            lines = [(i, t.rstrip("\n")) for i, t in enumerate(f, 1) if t.strip()]
        out = [{"prompt": t, "where": f"{path}:{i}"} for i, t in lines]
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def synthetic_records(task: str, n: int, split: str, seed: int) -> list[dict[str, Any]]:
    from dpoq_jax.data.synthetic import make_task

    exs = make_task(task, seed=seed).preference_examples(n, split)
    return [
        {
            "prompt": e.prompt,
            "chosen": e.chosen,
            "rejected": e.rejected,
            "meta": e.meta,
            "where": f"synthetic {task} {split} example {i}",
        }
        for i, e in enumerate(exs)
    ]


def encode_all(
    tok: Any, texts: Sequence[str | list], where: Sequence[str], *, nonempty: bool = False
) -> list[list[int]]:
    """Token ids of each text; an error (a character the tokenizer refuses, or with `nonempty` no token
    at all) names its `where` (file:line and key)."""
    out = []
    for text, w in zip(texts, where, strict=True):
        if isinstance(text, list):  # chat messages: the template's rendering, ready for the reply
            out.append(chat.render_ids(tok, text, add_generation_prompt=True, file=w))
            continue
        try:
            ids = list(tok.encode(text, add_special_tokens=False))
        except Exception as e:  # noqa: BLE001 - HF tokenizers raise plain Exception; name the input
            raise ValueError(f"{w}: {e}") from None
        if nonempty and not ids:
            raise ValueError(f"{w}: the prompt is empty (no tokens); decoding needs at least one, e.g. <bos>")
        out.append(ids)
    return out


def fit_prompts(
    prompts: list[list[int]], where: Sequence[str], new_tokens: int, context: int | None, truncate: bool
) -> int:
    """Refuse (or with `truncate`, cut from the left, in place) prompts that leave fewer than `new_tokens`
    positions of the model's `context`; returns how many were cut."""
    if context is None:
        return 0
    room = context - new_tokens
    if room < 1:
        raise ValueError(
            f"--max-new-tokens {new_tokens} leaves no room for a prompt in the model's context of {context} "
            "positions (max_position_embeddings)"
        )
    cut = 0
    for i, (p, w) in enumerate(zip(prompts, where, strict=True)):
        if len(p) > room:
            if not truncate:
                raise ValueError(
                    f"{w}: prompt of {len(p)} tokens + --max-new-tokens {new_tokens} exceed the model's "
                    f"context of {context} positions; lower --max-new-tokens or pass --truncate-prompt"
                )
            prompts[i], cut = p[len(p) - room :], cut + 1
    return cut


DEFAULT_NEW_TOKENS = 64


def default_new_tokens(prompts: list[list[int]], context: int | None) -> int:
    """`--max-new-tokens` when not given: DEFAULT_NEW_TOKENS, capped by what the model's context
    leaves after the longest prompt (at least 1: a prompt that fills the context is refused by
    `fit_prompts` with its file and line)."""
    if context is None:
        return DEFAULT_NEW_TOKENS
    return max(1, min(DEFAULT_NEW_TOKENS, context - max(map(len, prompts), default=0)))


SPLITS = ("train", "validation", "test")
SPLIT_HELP = (
    "split of the synthetic task; 'test' is neither trained on nor used for training's held-out eval "
    "(that is 'validation'), and is what `dpoq demo` reports"
)


def add_input_args(p: argparse.ArgumentParser, flag: str, file_help: str, noun: str, n: int) -> None:
    """The input of `generate` and `score`: a file (`flag`) or a synthetic task's `noun`s (--synthetic,
    --n, --split, --task-seed), exactly one of the two."""
    from dpoq_jax.data.synthetic import TASKS

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(flag, help=f"{file_help} (this or --synthetic is required)")
    src.add_argument("--synthetic", choices=sorted(TASKS), help=f"{noun} of a synthetic task (this or "
                     f"{flag} is required)")  # fmt: skip
    p.add_argument("--n", type=int, default=n, help=f"number of synthetic {noun}")
    p.add_argument("--split", choices=SPLITS, default="test", help=SPLIT_HELP)
    p.add_argument("--task-seed", type=int, default=0, help="seed of the synthetic task")


def _parser() -> argparse.ArgumentParser:
    from dpoq_jax.cli import Parser

    p = Parser(prog="dpoq generate", description=__doc__)
    p.add_argument("--model", required=True, help="HF directory or `dpoq train` run folder")
    p.add_argument(
        "--reference", default=None, help="reference model for implicit rewards; --mode guided needs it"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="'synthetic' or a tokenizer directory (None: the model's own, or what its run trained with)",
    )
    add_input_args(p, "--prompts", ".jsonl with a 'prompt' key per line (a string, or chat messages: "
                   "rendered with the chat template), or a text file, one per line",
                   "prompts", 16)  # fmt: skip
    p.add_argument("--mode", choices=["greedy", "sample", "beam", "guided"], default="greedy",
                   help="greedy, sampling, beam search or reward-guided search")  # fmt: skip
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"tokens generated at most per prompt (EOS included); None: {DEFAULT_NEW_TOKENS}, or fewer "
        "where the model's context cannot hold the longest prompt and that many",
    )
    p.add_argument(
        "--truncate-prompt",
        action="store_true",
        help="cut prompts from the left to fit the model's context with --max-new-tokens (otherwise such "
        "a prompt is an error)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (--mode sample)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0: all (--mode sample)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep (--mode sample)")
    p.add_argument("--num-beams", type=int, default=4, help="beams per prompt (--mode beam / guided)")
    p.add_argument("--length-penalty", type=float, default=0.0, help="alpha in score / length**alpha")
    p.add_argument("--beta", type=float, default=0.1, help="beta of the implicit reward beta*log(pi/pi_ref)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded at a time")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", default=None, help="compute dtype, e.g. bfloat16 (None: the model's)")
    p.add_argument("--cache-dtype", default=None, help="KV cache dtype (None: the compute dtype)")
    p.add_argument("--eos-id", type=int, default=None, help="end token id (None: the tokenizer's)")
    p.add_argument("--out", required=True, help="output .jsonl")
    return p


@reports_user_errors("dpoq generate")
def generate_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from dpoq_jax.decode.beam import BeamConfig, beam_search
    from dpoq_jax.decode.guided import reward_guided_search
    from dpoq_jax.decode.sampling import SampleConfig, generate

    if args.mode == "guided" and not args.reference:
        raise SystemExit("dpoq generate: --mode guided needs --reference")
    recs = (
        read_prompts(args.prompts)
        if args.prompts
        else synthetic_records(args.synthetic, args.n, args.split, args.task_seed)
    )
    tok = load_tokenizer(args.tokenizer, args.model)
    eos = args.eos_id if args.eos_id is not None else tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    prompts = encode_all(tok, [r["prompt"] for r in recs], [r["where"] for r in recs], nonempty=True)
    model = load_model(args.model, args.dtype)
    ref = load_model(args.reference, args.dtype, "--reference") if args.reference else None
    context = context_length(model, ref)
    capped = args.max_new_tokens is None and default_new_tokens(prompts, context) < DEFAULT_NEW_TOKENS
    if args.max_new_tokens is None:
        args.max_new_tokens = default_new_tokens(prompts, context)
    cut = fit_prompts(prompts, [r["where"] for r in recs], args.max_new_tokens, context, args.truncate_prompt)
    if capped:
        print(f"dpoq generate: --max-new-tokens {args.max_new_tokens} (what the model's context of "
              f"{context} positions leaves after the longest prompt)", file=sys.stderr)  # fmt: skip
    if cut:
        print(f"dpoq generate: {cut} prompts cut from the left to fit the context (--truncate-prompt)",
              file=sys.stderr)  # fmt: skip

    with paths.open(args.out, "w", encoding="utf-8") as f:  # on gs:// uploaded when it closes
        for s in range(0, len(prompts), args.batch_size):
            batch = prompts[s : s + args.batch_size]
            if len(batch) < args.batch_size and s > 0:  # keep one compiled shape: pad with copies
                batch = batch + [batch[-1]] * (args.batch_size - len(batch))
            if args.mode in ("greedy", "sample"):
                cfg = SampleConfig(
                    max_new_tokens=args.max_new_tokens,
                    temperature=0.0 if args.mode == "greedy" else args.temperature,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    eos_id=eos,
                    pad_id=pad,
                    cache_dtype=args.cache_dtype,
                )
                g = generate(model, batch, cfg, seed=args.seed + s, ref_model=ref, beta=args.beta)
                g = _add_beam_axis(g)
            else:
                cfg = BeamConfig(
                    num_beams=args.num_beams,
                    max_new_tokens=args.max_new_tokens,
                    length_penalty=args.length_penalty,
                    eos_id=eos,
                    pad_id=pad,
                    cache_dtype=args.cache_dtype,
                )
                if args.mode == "beam":
                    g = beam_search(model, batch, cfg, ref_model=ref, beta=args.beta)
                else:
                    g = reward_guided_search(model, ref, batch, cfg, beta=args.beta)
            for b in range(min(args.batch_size, len(prompts) - s)):
                rec = recs[s + b]
                out = {"index": s + b, "prompt": rec["prompt"], "mode": args.mode, "outputs": []}
                if "meta" in rec:
                    out["meta"] = rec["meta"]
                for k in range(g.tokens.shape[1]):
                    if g.valid is not None and not g.valid[b, k]:
                        continue
                    n = int(g.mask[b, k].sum())
                    ids = [int(t) for t in g.tokens[b, k, :n]]
                    o = {
                        "text": tok.decode([t for t in ids if t != eos]),
                        "ids": ids,
                        "length": n,
                        "finished": bool(n and ids[-1] == eos),
                        "logp": float(g.logps[b, k].sum()),
                        "score": float(g.score[b, k]),
                    }
                    if g.rewards is not None:
                        o["reward"] = float(g.rewards[b, k].sum())
                        o["token_rewards"] = [float(x) for x in g.rewards[b, k, :n]]
                    out["outputs"].append(o)
                f.write(json.dumps(out, ensure_ascii=False) + "\n")
    print(f"dpoq generate: wrote {len(prompts)} prompts ({args.mode}) to {args.out}", file=sys.stderr)
    return 0


def _add_beam_axis(g: Any) -> Any:
    import dataclasses

    return dataclasses.replace(
        g,
        **{
            k: (None if getattr(g, k) is None else np.asarray(getattr(g, k))[:, None])
            for k in ("tokens", "mask", "logps", "score", "ref_logps", "rewards")
        },
    )
