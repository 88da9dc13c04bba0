r"""`dpoq generate`: prompts -> sampled, greedy, beam or reward-guided responses as JSON lines.

    dpoq generate --model DIR --prompts prompts.jsonl --mode beam --num-beams 5 --out out.jsonl
    dpoq generate --model WORKDIR --tokenizer synthetic --synthetic error_injection --n 16 \
        --mode guided --reference SFT_WORKDIR --out out.jsonl

A model is anything `dpoq_jax.train.load.load_model` takes: a Hugging Face directory, a params
checkpoint, or a training run's folder (its newest intact checkpoint).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

from dpoq_jax import paths
from dpoq_jax.commands.prompts import (
    BETA_HELP,
    DEFAULT_NEW_TOKENS,
    add_input_args,
    context_length,
    default_new_tokens,
    encode_all,
    fit_prompts,
    load_tokenizer,
    read_prompts,
    resolve_beta,
    synthetic_records,
)
from dpoq_jax.data.errors import reports_user_errors
from dpoq_jax.train.load import load_model


def _parser():
    from dpoq_jax.parser import Parser

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
    p.add_argument(
        "--length-penalty",
        type=float,
        default=0.0,
        help="alpha in a finished beam's score / length**alpha, as in transformers (default there: 1.0)",
    )
    p.add_argument(
        "--early-stopping",
        choices=("false", "true", "never"),
        default="false",
        help="when a prompt's beam search stops taking finished beams, as transformers' early_stopping",
    )
    p.add_argument("--beta", type=float, default=None, help=BETA_HELP)
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
    model = load_model(args.model, dtype=args.dtype)
    ref = load_model(args.reference, dtype=args.dtype, flag="--reference") if args.reference else None
    rw = {"beta": resolve_beta(args.beta, args.model, "--model")} if ref is not None else {}  # rewards
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
                g = generate(model, batch, cfg, seed=args.seed + s, ref_model=ref, **rw)
                g = _add_beam_axis(g)
            else:
                cfg = BeamConfig(
                    num_beams=args.num_beams,
                    max_new_tokens=args.max_new_tokens,
                    length_penalty=args.length_penalty,
                    early_stopping={"false": False, "true": True}.get(args.early_stopping, "never"),
                    eos_id=eos,
                    pad_id=pad,
                    cache_dtype=args.cache_dtype,
                )
                if args.mode == "beam":
                    g = beam_search(model, batch, cfg, ref_model=ref, **rw)
                else:
                    g = reward_guided_search(model, ref, batch, cfg, **rw)
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
