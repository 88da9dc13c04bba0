"""What `dpoq generate` and `dpoq score` read: prompts and pairs from files or a synthetic task, the
tokenizer that goes with a model, prompts fitted to the model's context."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from dpoq_jax import paths
from dpoq_jax.data import chat
from dpoq_jax.data.errors import ErrorPolicy
from dpoq_jax.data.jsonl import check_fields, iter_json_lines


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
    return hf.load_tokenizer(spec, flag)


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


BETA_HELP = (
    "beta of the implicit reward beta*log(pi/pi_ref) (None: the loss.beta of the run the policy comes "
    "from; required when the policy is not a `dpoq train` run)"
)


def resolve_beta(beta: float | None, policy: str, flag: str = "--policy") -> float:
    """--beta when given, else the β the policy's training run used (its config.json loss.beta)."""
    from dpoq_jax.train.load import run_config

    if beta is not None:
        return beta
    cfg = run_config(policy)
    if cfg is None or "beta" not in cfg.get("loss", {}):
        raise ValueError(f"{flag} {policy}: not a `dpoq train` run, so its beta is unknown; pass --beta")
    return float(cfg["loss"]["beta"])
