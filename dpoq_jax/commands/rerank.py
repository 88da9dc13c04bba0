r"""`dpoq rerank`: best-of-N by implicit process rewards (Yuan et al. 2024) -> JSON lines.

    dpoq rerank --policy DPO_DIR --reference SFT_DIR --candidates cands.jsonl --aggregate min --out best.jsonl
    dpoq rerank ... --aggregate vote --answer-regex 'answer: (\S+)'     # weighted majority vote
    dpoq rerank ... --baseline reference                                # rank by Σ log π_ref instead

cands.jsonl, one form per file:
  {"prompt": str, "candidates": [str, ...]}   one prompt a line (other keys are copied to the output), or
  {"prompt": str, "response": str}            one candidate a line; consecutive lines with the same prompt
                                              are one prompt's candidates (a prompt that comes back after
                                              another prompt's lines is an error: mixed prompts).
Each candidate is cut into steps (--steps, default 'newline'); a step's reward is the sum of its tokens'
β log π/π_ref, and a candidate's score is the min / sum / last / mean of its step rewards. `vote` groups
the candidates by final answer (--answer-regex; default the last non-empty line) and weights each answer
by Σ sigmoid(score under --vote-score) of its candidates (--vote-weight count: their number).
Writes one line per prompt: where, prompt, chosen (index), candidate, scores (one per candidate), and
for vote the answers and each answer's total weight; with steps, each candidate's step rewards.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import numpy as np

from dpoq_jax import paths
from dpoq_jax.commands.prompts import encode_all, load_tokenizer
from dpoq_jax.commands.score import STEPS_HELP, add_model_args, score_all
from dpoq_jax.data.errors import DataError, ErrorPolicy, reports_user_errors
from dpoq_jax.data.jsonl import check_fields, iter_json_lines
from dpoq_jax.prm import AGGREGATES, VOTE_WEIGHTS


def read_candidates(path: str) -> list[dict[str, Any]]:
    """Groups {"prompt", "candidates", "names", "where", "meta"} from either form (module docstring);
    every bad line is one error naming file:line (and key)."""
    groups: list[dict[str, Any]] = []
    form: tuple[str, int] | None = None
    first_line: dict[str, int] = {}  # one-candidate form: the line each prompt's run started on
    for line, rec in iter_json_lines(path, ErrorPolicy("fail")):
        if not isinstance(rec, dict):
            raise DataError(f"expected a JSON object, got {type(rec).__name__}", file=path, line=line)
        this = "candidates" if "candidates" in rec else "response"
        form = form or (this, line)
        if this != form[0]:
            raise DataError(f"a line with {this!r}, but line {form[1]} has {form[0]!r}: one form a file",
                            kind="mixed_forms", file=path, line=line, key=this)  # fmt: skip
        where = f"{path}:{line}"
        if this == "candidates":
            check_fields(rec, ("prompt",), (), file=path, line=line)
            cands = rec["candidates"]
            if not isinstance(cands, list) or not cands:
                raise DataError("expected a non-empty list of candidate strings", kind="empty_candidates",
                                file=path, line=line, key="candidates")  # fmt: skip
            for j, c in enumerate(cands):
                check_fields({f"candidates[{j}]": c}, (f"candidates[{j}]",), (f"candidates[{j}]",),
                             file=path, line=line)  # fmt: skip
            meta = {k: v for k, v in rec.items() if k not in ("prompt", "candidates")}
            groups.append({"prompt": rec["prompt"], "candidates": list(cands), "where": where, "meta": meta,
                           "names": [f"{where}, candidate {j}" for j in range(len(cands))]})  # fmt: skip
            continue
        check_fields(rec, ("prompt", "response"), ("response",), file=path, line=line)
        prompt = rec["prompt"]
        if groups and groups[-1]["prompt"] == prompt:
            groups[-1]["candidates"].append(rec["response"])
            groups[-1]["names"].append(f"{where}, key 'response'")
            continue
        if prompt in first_line:
            raise DataError(f"the prompt of line {first_line[prompt]} again after other prompts: a prompt's "
                            "candidates must be consecutive lines (mixed prompts)", kind="mixed_prompts",
                            file=path, line=line, key="prompt")  # fmt: skip
        first_line[prompt] = line
        groups.append({"prompt": prompt, "candidates": [rec["response"]], "where": where, "meta": {},
                       "names": [f"{where}, key 'response'"]})  # fmt: skip
    if not groups:
        raise ValueError(f"{path}: no candidates")
    return groups


def final_answer(text: str, pattern: re.Pattern[str] | None) -> str | None:
    """The last match of `pattern` (its first group if it has one), or without a pattern the last
    non-empty line; stripped. None when there is none."""
    if pattern is None:
        lines = [x.strip() for x in text.splitlines() if x.strip()]
        return lines[-1] if lines else None
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    return (matches[-1].group(1) if pattern.groups else matches[-1].group(0)).strip()


def _parser():
    from dpoq_jax.parser import Parser

    p = Parser(prog="dpoq rerank", description=__doc__)
    add_model_args(p)
    p.add_argument("--candidates", required=True, help="candidates .jsonl (forms in the description)")
    p.add_argument("--aggregate", choices=(*AGGREGATES, "vote"), default="min",
                   help="a candidate's score from its step rewards, or a weighted vote over final answers")
    p.add_argument("--steps", default=None, help=STEPS_HELP + " (None: 'newline', and a candidate without "
                   "a newline is one step; given, a SPEC that ends no step in the whole file is an error)")
    p.add_argument("--baseline", choices=("reference",), default=None,
                   help="score each candidate by the reference's log-likelihood Σ log π_ref instead (None: "
                   "implicit process rewards)")
    p.add_argument("--answer-regex", default=None, help="final answer for vote: the last match (its first "
                   "group if it has one) (None: the last non-empty line)")
    p.add_argument("--vote-score", choices=AGGREGATES, default="min", help="the score a vote is weighted by")
    p.add_argument("--vote-weight", choices=VOTE_WEIGHTS, default="sigmoid",
                   help="an answer's weight: Σ sigmoid(score) of its candidates, or their count")
    p.add_argument("--out", required=True, help="output .jsonl (one line per prompt)")
    return p  # fmt: skip


@reports_user_errors("dpoq rerank")
def rerank_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from dpoq_jax.analysis import text_steps as st
    from dpoq_jax.prm import weighted_vote

    pattern = st.parse_spec(args.steps if args.steps is not None else st.NEWLINE)
    try:
        answer_re = re.compile(args.answer_regex) if args.answer_regex is not None else None
    except re.error as e:
        raise ValueError(f"--answer-regex {args.answer_regex!r}: not a regular expression ({e})") from None
    groups = read_candidates(args.candidates)
    tok = load_tokenizer(args.tokenizer, args.policy, "--policy")
    eos = [] if args.no_eos else [tok.eos_token_id]
    prompts, responses, names = [], [], []
    for g in groups:
        (p_ids,) = encode_all(tok, [g["prompt"]], [f"{g['where']}, key 'prompt'"], nonempty=True)
        for ids in encode_all(tok, g["candidates"], g["names"]):
            prompts.append(p_ids)
            responses.append(ids + eos)
        names += g["names"]
    if args.aggregate == "vote":
        answers = [[final_answer(c, answer_re) for c in g["candidates"]] for g in groups]
        for g, a in zip(groups, answers, strict=True):
            if all(x is None for x in a):
                what = f"--answer-regex {args.answer_regex!r}" if answer_re else "the last-line rule"
                raise ValueError(f"{g['where']}: {what} finds no answer in any of the {len(a)} candidates")
    scores = score_all(args, tok, prompts, responses, names, "dpoq rerank")
    segs = [st.segment(tok, s.ids, pattern) for s in scores]
    if args.steps is not None:
        st.check_cut(segs, args.steps, args.candidates)
    values = st.step_values(scores, segs)
    how = args.vote_score if args.aggregate == "vote" else args.aggregate
    if args.baseline == "reference":
        flat = np.asarray([float(np.sum(s.ref_logps, dtype=np.float64)) for s in scores])
    else:
        flat = np.asarray([v[how] for v in values])
    n = 0
    with paths.open(args.out, "w", encoding="utf-8") as f:
        for i, g in enumerate(groups):
            k = len(g["candidates"])
            sc, vals = flat[n : n + k], values[n : n + k]
            n += k
            out: dict[str, Any] = {"where": g["where"], "prompt": g["prompt"], "aggregate": args.aggregate,
                                   "baseline": args.baseline}  # fmt: skip
            if args.aggregate == "vote":
                chosen, votes = weighted_vote(answers[i], sc, args.vote_weight)
                out.update(vote_score=args.vote_score, vote_weight=args.vote_weight, answers=answers[i],
                           votes=votes)  # fmt: skip
            else:
                chosen = int(np.argmax(sc))  # ties: the first
            out.update(chosen=chosen, candidate=g["candidates"][chosen], scores=[float(x) for x in sc])
            if args.baseline is None:
                out["step_rewards"] = [v["rewards"] for v in vals]
            if g["meta"]:
                out["meta"] = g["meta"]
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    print(f"dpoq rerank: {len(groups)} prompts, {len(scores)} candidates (β = {args.beta}) -> {args.out}",
          file=sys.stderr)  # fmt: skip
    return 0
