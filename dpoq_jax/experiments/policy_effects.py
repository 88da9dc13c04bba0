"""What DPO does to the policy's own answers: gold quality of its generations, and the chosen/rejected
log-likelihoods during training (shared by the experiments; issue: the demo's degraded greedy answers)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpoq_jax.analysis import document as doc
from dpoq_jax.analysis.seeds import Items
from dpoq_jax.decode.beam import best_beams
from dpoq_jax.decode.core import strip_eos
from dpoq_jax.decode.sampling import sample_responses
from dpoq_jax.train.metrics import eval_curve

GEN_COLUMNS = ("gold score", "exact match", "length")
TRAJ_KEYS = ("logps/chosen", "logps/rejected", "rewards/margins")
TRAJ_COLUMNS = (
    "chosen log-lik. first",
    "chosen log-lik. last",
    "rejected log-lik. first",
    "rejected log-lik. last",
    "margin last",
)


def generation_quality(
    model: Any, task: Any, prompts: Sequence[str], max_new: int, seed: int
) -> dict[str, dict[str, Items]]:
    """Gold score, exact match (a response equal to the task's correct answer, where it has one; else
    NaN) and length of greedy (1 beam) and sampled (T = 1) generations on `prompts`, per prompt
    (`Items`: the mean, with a bootstrap interval over seeds and prompts once merged; two models'
    values on the same prompts subtract into a paired difference)."""
    tok = task.tokenizer
    ids = [tok.encode(p) for p in prompts]
    outs = {
        "greedy": best_beams(model, ids, num_beams=1, max_new_tokens=max_new),
        "sampled": sample_responses(model, ids, max_new_tokens=max_new, seed=seed),
    }
    res = {}
    for how, gens in outs.items():
        gold = [task.gold_score(p, g) for p, g in zip(prompts, gens, strict=True)]
        if hasattr(task, "expected_ids"):
            exact = [
                float(strip_eos(g, tok.eos_token_id) == task.expected_ids(p)[:-1])
                for p, g in zip(prompts, gens, strict=True)
            ]
        else:
            exact = [float("nan")] * len(prompts)
        lens = [len(strip_eos(g, tok.eos_token_id)) for g in gens]
        res[how] = {
            "gold score": Items.mean(gold),
            "exact match": Items.mean(exact),
            "length": Items.mean(lens),
        }
    return res


def generation_rows(label: str, q: dict[str, dict[str, float]]) -> list[list[object]]:
    """Table rows [model, decoding, gold, exact, length] of `generation_quality`'s result."""
    return [[label, how, *(q[how][c] for c in GEN_COLUMNS)] for how in ("greedy", "sampled")]


def difference_rows(
    label: str, q: dict[str, dict[str, Items]], base: dict[str, dict[str, Items]]
) -> list[list[object]]:
    """Rows [label, decoding, paired differences q − base per column] (same prompts)."""
    return [
        [label, how, *(q[how][c] - base[how][c] for c in GEN_COLUMNS)] for how in ("greedy", "sampled")
    ]


def trajectory(run_dir: Path | str) -> tuple[list[dict], dict[str, float]]:
    """(held-out eval curve, first/last chosen and rejected log-likelihoods and the last margin)."""
    curve = eval_curve(str(run_dir), TRAJ_KEYS)
    a, b = curve[0], curve[-1]
    vals = (
        a["logps/chosen"],
        b["logps/chosen"],
        a["logps/rejected"],
        b["logps/rejected"],
        b["rewards/margins"],
    )
    return curve, dict(zip(TRAJ_COLUMNS, (float(v) for v in vals), strict=True))


def trajectory_figure(curves: dict[str, list[dict]], name: str, title: str) -> doc.Figure:
    """Held-out chosen (solid) and rejected (dashed) mean summed log-likelihood against DPO step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    for label, curve in curves.items():
        steps = [r["step"] for r in curve]
        (line,) = ax.plot(steps, [r["logps/chosen"] for r in curve], "-", label=f"{label} chosen")
        ax.plot(
            steps,
            [r["logps/rejected"] for r in curve],
            "--",
            color=line.get_color(),
            label=f"{label} rejected",
        )
    ax.set_xlabel("DPO step")
    ax.set_ylabel("held-out log π(y|x)")
    ax.legend(fontsize=6)
    ax.set_title(title, fontsize=9)
    return doc.Figure(name, doc.fig_to_png(fig), title)
