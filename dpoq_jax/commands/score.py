r"""`dpoq score`: per-token implicit rewards of given responses -> JSON, HTML report, PNG heatmaps.

    dpoq score --policy DPO_DIR --reference SFT_DIR --pairs pairs.jsonl --out-dir report/
    dpoq score --policy DPO_WORKDIR --reference SFT_WORKDIR --tokenizer synthetic \
        --synthetic error_injection --n 64 --out-dir report/      # + credit-assignment metrics

pairs.jsonl: one object a line with "prompt" and either "response", or "chosen" and "rejected"; as
strings, or as chat messages (TRL's formats, implicit prompt included: data/chat.py), tokenised with the
chat template as training does.
With --steps SPEC ("newline", a literal delimiter, or re:PATTERN) each response also gets its steps
(token ranges, texts) and implicit process rewards (each step's Σ r_t) with their min/sum/last/mean.
Writes OUT/scores.json, OUT/report.html, OUT/png/item_<i>.png (the first --max-png items) and, for
the error-injection task, OUT/credit.json (top-1 and AUROC of the injected-error localisation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dpoq_jax import paths
from dpoq_jax.commands.prompts import (
    BETA_HELP,
    add_input_args,
    context_length,
    encode_all,
    load_tokenizer,
    resolve_beta,
    synthetic_records,
)
from dpoq_jax.data import chat
from dpoq_jax.data.errors import ErrorPolicy, reports_user_errors
from dpoq_jax.data.jsonl import check_fields, iter_json_lines
from dpoq_jax.train.load import load_model


def read_pairs(path: str) -> list[dict[str, Any]]:
    """{"prompt", "response"} or {"prompt", "chosen", "rejected"} lines; bad lines name file and line."""
    out = []
    for line, rec in iter_json_lines(path, ErrorPolicy("fail")):
        pair = isinstance(rec, dict) and "response" not in rec
        responses = ("chosen", "rejected") if pair else ("response",)
        if chat.is_conversational(rec):  # messages (TRL's formats), scored as training tokenises them
            if pair:
                p, c, r = chat.split_preference(rec, file=path, line=line)
                rec = {**rec, "prompt": p, "chosen": c, "rejected": r}
            else:
                rec = {**rec, **{k: chat.check_messages(rec.get(k), file=path, line=line, key=k)
                                 for k in ("prompt", "response")}}
        else:
            check_fields(rec, ("prompt", *responses), responses, file=path, line=line)
        out.append({**rec, "where": f"{path}:{line}"})
    if not out:
        raise ValueError(f"{path}: no pairs")
    return out


STEPS_HELP = (
    "cut each response into steps for implicit process rewards: 'newline' (a run of newlines ends a "
    "step), re:PATTERN (each match of the regular expression ends one) or a literal delimiter; a step "
    "is the tokens whose text ends in it, its reward their summed reward"
)


def token_strings(tok: Any, ids: list[int]) -> list[str]:
    return [tok.decode([i]) for i in ids]


def _parser() -> argparse.ArgumentParser:
    from dpoq_jax.parser import Parser

    p = Parser(prog="dpoq score", description=__doc__)
    add_model_args(p)
    add_input_args(p, "--pairs", ".jsonl with prompt + response, or prompt + chosen + rejected", "pairs", 32)
    p.add_argument("--with-qv", action="store_true", help="also write Q(s_t,a_t) and V(s_t)")
    p.add_argument("--steps", default=None, help=STEPS_HELP + " (None: no steps)")
    p.add_argument("--max-png", type=int, default=20, help="heatmaps written, for the first items")
    p.add_argument("--out-dir", required=True, help="report folder (created)")
    return p


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options of scoring responses under a policy and a reference (`score`, `rerank`)."""
    p.add_argument("--policy", required=True, help="HF directory or `dpoq train` run folder")
    p.add_argument("--reference", required=True, help="HF directory or `dpoq train` run folder")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="'synthetic' or a tokenizer directory (None: the policy's own, or what its run trained with)",
    )
    p.add_argument("--beta", type=float, default=None, help=BETA_HELP)
    p.add_argument("--no-eos", action="store_true", help="do not append EOS to each response")
    p.add_argument(
        "--truncate",
        action="store_true",
        help="cut responses to fit the models' context (otherwise a longer prompt + response is an error)",
    )
    p.add_argument("--dtype", default=None, help="compute dtype, e.g. bfloat16 (None: the models')")
    p.add_argument("--batch-size", type=int, default=32, help="responses scored at a time")


def score_all(
    args: argparse.Namespace,
    tok: Any,
    prompts: list[list[int]],
    responses: list[list[int]],
    names: list[str],
    prog: str,
) -> list[Any]:
    """Load --policy and --reference, fit the responses to their context, resolve args.beta in place,
    and score every (prompt, response): [TokenScores]."""
    from dpoq_jax.analysis.credit import score_responses

    policy = load_model(args.policy, dtype=args.dtype, flag="--policy")
    reference = load_model(args.reference, dtype=args.dtype, flag="--reference")
    args.beta = resolve_beta(args.beta, args.policy)
    context = context_length(policy, reference)
    cut = fit_responses(prompts, responses, names, context, args.truncate)
    if cut:
        print(f"{prog}: {cut} responses cut to the context of {context} positions (--truncate)",
              file=sys.stderr)  # fmt: skip
    return score_responses(
        policy,
        reference,
        prompts,
        responses,
        args.beta,
        with_qv=getattr(args, "with_qv", False),
        pad_id=tok.pad_token_id or 0,
        names=names,
        batch_size=args.batch_size,
    )


def fit_responses(
    prompts: list[list[int]],
    responses: list[list[int]],
    names: list[str],
    context: int | None,
    truncate: bool,
) -> int:
    """Refuse (or with `truncate`, cut in place) responses whose prompt + response exceed the models'
    `context` positions; returns how many were cut."""
    cut = 0
    for n, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if context is None or len(p) + len(r) <= context:
            continue
        if not truncate or len(p) >= context:
            hint = "pass --truncate to cut the response" if len(p) < context else "the prompt alone fills it"
            raise ValueError(
                f"{names[n]}: prompt {len(p)} + response {len(r)} tokens exceed the models' context of "
                f"{context} positions (max_position_embeddings); {hint}"
            )
        responses[n], cut = r[: context - len(p)], cut + 1
    return cut


@reports_user_errors("dpoq score")
def score_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from dpoq_jax.analysis import report as rep
    from dpoq_jax.analysis import text_steps as st
    from dpoq_jax.analysis.stats import credit_assignment_score

    pattern = st.parse_spec(args.steps) if args.steps is not None else None
    recs = (
        read_pairs(args.pairs)
        if args.pairs
        else synthetic_records(args.synthetic, args.n, args.split, args.task_seed)
    )
    tok = load_tokenizer(args.tokenizer, args.policy, "--policy")
    eos = [] if args.no_eos else [tok.eos_token_id]
    prompts, responses, names, owner = [], [], [], []
    for i, r in enumerate(recs):
        keys = ("chosen", "rejected") if "chosen" in r and "rejected" in r else ("response",)
        if isinstance(r["prompt"], list):  # chat: the template's tokens, end of turn included, no EOS
            p_ids, chat_ids, _ = chat.tokenize_chat(tok, r["prompt"], [(k, r[k]) for k in keys],
                                                    file=r["where"])
        else:
            (p_ids,) = encode_all(tok, [r["prompt"]], [f"{r['where']}, key 'prompt'"], nonempty=True)
        for j, k in enumerate(keys):
            if isinstance(r["prompt"], list):
                ids = chat_ids[j]
            else:
                (ids,) = encode_all(tok, [r[k]], [f"{r['where']}, key {k!r}"])
                ids = ids + eos
            prompts.append(p_ids)
            responses.append(ids)
            names.append(f"{r['where']}, key {k!r}")
            owner.append((i, k))
    scores = score_all(args, tok, prompts, responses, names, "dpoq score")
    items: list[dict[str, Any]] = [  # a chat prompt is shown as the template renders it
        {"prompt": r["prompt"] if isinstance(r["prompt"], str) else chat.render_prompt_text(tok, r["prompt"]),
         "meta": r.get("meta", {}), "responses": {}} for r in recs
    ]
    for (i, k), s in zip(owner, scores, strict=True):
        items[i]["responses"][k] = s.to_dict(token_strings(tok, s.ids))
    if pattern is not None:
        segs = [st.segment(tok, s.ids, pattern) for s in scores]
        st.check_cut(segs, args.steps, args.pairs or f"synthetic {args.synthetic} {args.split}")
        for (i, k), v in zip(owner, st.step_values(scores, segs), strict=True):
            items[i]["responses"][k]["steps"] = {"spec": args.steps, **v}
    report = {"beta": args.beta, "policy": args.policy, "reference": args.reference, "items": items}
    if args.synthetic:
        report.update(task=args.synthetic, split=args.split, task_seed=args.task_seed)

    dest = args.out_dir  # a gs:// folder is written locally, then uploaded
    out = Path(paths.staging_dir() if paths.is_gcs(dest) else dest)
    (out / "png").mkdir(parents=True, exist_ok=True)
    rep.save_json(report, out / "scores.json")
    rep.write_html(report, out / "report.html")
    for i, item in enumerate(items[: args.max_png]):
        rep.write_png(item, out / "png" / f"item_{i}.png")
    if args.synthetic == "error_injection":
        pos = [r["meta"]["error_positions"] for r in recs]
        credit = credit_assignment_score([it["responses"]["rejected"]["rewards"] for it in items], pos)
        credit.update(beta=args.beta, split=args.split)
        (out / "credit.json").write_text(json.dumps(credit, indent=1))
        print(json.dumps(credit), file=sys.stderr)
    if str(out) != dest:
        paths.upload_dir(str(out), dest)
    print(f"dpoq score: {len(items)} items -> {dest}/report.html, scores.json, png/", file=sys.stderr)
    return 0
