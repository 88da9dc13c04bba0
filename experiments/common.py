"""Shared pieces of the experiment scripts: statistics, tables, figures, result files, machine facts,
and thin glue to the library.

Pure functions: Wilson interval, correlations, the §5.4 comparison, exact V* of the dense_reward task.
Files: results/<name>.md with its PNGs and self-contained HTML (`Report`). Glue: training runs go
through dpoq_jax.train.loop.train (with a settings-keyed cache so experiments share runs), decoding
through dpoq_jax.decode, scoring through dpoq_jax.analysis; nothing of theirs is re-implemented here.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import html
import io
import math
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "experiments" / "results"
CONFIGS_DIR = REPO_ROOT / "experiments" / "configs"


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    `successes` may be fractional (ties counted as half a win); n must be > 0.
    """
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be > 0, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes must be in [0, n={n}], got {successes}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At k = 0 or k = n one end is exactly 0 or 1; say so rather than leave a rounding error.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.size != y.size or x.size < 2:
        raise ValueError(f"pearson: need two equal-length arrays of >= 2 values, got {x.size} and {y.size}")
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), 0-based.

    dpoq_jax.analysis.metrics ranks the same way, but privately (_average_ranks, for its AUROC); use
    it here once the library makes it public.
    """
    x = np.asarray(x, np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size)
    xs = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_ranks(x), _ranks(y))


# ----------------------------------------------------------------------------------------------
# §5.4: E_{a~π_ref}[β log π/π_ref] = −β KL(π_ref‖π)
# ----------------------------------------------------------------------------------------------


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_ref_policy_np(policy_logits_BTV: np.ndarray, ref_logits_BTV: np.ndarray) -> np.ndarray:
    """KL(π_ref(·|s_t) ‖ π(·|s_t)) per state in float64 numpy -> [B, T] (independent reference)."""
    lp, lr = _log_softmax64(policy_logits_BTV), _log_softmax64(ref_logits_BTV)
    return np.sum(np.exp(lr) * (lr - lp), axis=-1)


def section54_summary(
    exact_BT: np.ndarray, sampled_reward_BT: np.ndarray, mask_BT: np.ndarray
) -> dict[str, float]:
    """Compare the two sides of §5.4 over the states visited by reference samples.

    exact_BT: E_{a~π_ref}[β log π/π_ref] computed over the whole vocabulary at each state
    (= −β KL, from tokenq.expected_ref_reward). sampled_reward_BT: β log π/π_ref of the token the
    reference actually sampled there (a one-sample Monte-Carlo estimate of the same expectation).
    Returns per-token means, the MC standard error, and the largest exact value (must be <= 0).
    """
    m = np.asarray(mask_BT, bool)
    if not m.any():
        raise ValueError("section54_summary: mask has no real tokens")
    exact = np.asarray(exact_BT, np.float64)[m]
    mc = np.asarray(sampled_reward_BT, np.float64)[m]
    diff = mc - exact  # zero-mean per state if the identity holds; its SE measures the MC noise
    return {
        "tokens": int(m.sum()),
        "exact_mean": float(exact.mean()),
        "exact_max": float(exact.max()),
        "mc_mean": float(mc.mean()),
        "mc_se": float(mc.std(ddof=1) / math.sqrt(mc.size)) if mc.size > 1 else float("nan"),
        "diff_mean": float(diff.mean()),
        "diff_se": float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else float("nan"),
        "per_response_exact": float((np.asarray(exact_BT, np.float64) * m).sum(-1).mean()),
        "per_response_mc": float((np.asarray(sampled_reward_BT, np.float64) * m).sum(-1).mean()),
    }


# ----------------------------------------------------------------------------------------------
# Machine facts and commands
# ----------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    """Where and when a result was produced (written into every results file)."""
    import jax

    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu cores visible": str(os.cpu_count()),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": f"{jax.default_backend()} ({jax.device_count()} device(s))",
    }
    try:
        import flax

        info["flax"] = flax.__version__
    except ImportError:
        pass
    return info


def command_line(module: str | None = None, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, as a user would type it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    head = f"python -m {module}" if module else " ".join(shlex.quote(a) for a in sys.argv[:1])
    return " ".join([head] + [shlex.quote(a) for a in argv])


# ----------------------------------------------------------------------------------------------
# Tables, figures, reports
# ----------------------------------------------------------------------------------------------


def fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        if math.isnan(x):
            return "nan"
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 10 ** (-digits)):
            return f"{x:.{digits}g}"
        return f"{x:.{digits}f}"
    return str(x)


@dataclasses.dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]
    caption: str = ""

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.headers):
                raise ValueError(f"Table row {i} has {len(row)} cells, headers have {len(self.headers)}")

    def markdown(self) -> str:
        cells = [[fmt(c) for c in row] for row in self.rows]
        lines = ["| " + " | ".join(self.headers) + " |", "|" + "|".join("---" for _ in self.headers) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return ("\n".join(lines) + ("\n\n" + self.caption if self.caption else "")).strip()

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>" for row in self.rows
        )
        cap = f"<p class='caption'>{html.escape(self.caption)}</p>" if self.caption else ""
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{cap}"


@dataclasses.dataclass
class Figure:
    """A PNG figure: `name` is its file name stem; `png` its bytes."""

    name: str
    png: bytes
    caption: str = ""


def fig_to_png(fig: Any, dpi: int = 110) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


@dataclasses.dataclass
class Section:
    title: str
    text: str = ""
    items: list[Table | Figure | str] = dataclasses.field(default_factory=list)


def _md_inline(text: str) -> str:
    """Tiny Markdown -> HTML for prose: paragraphs, `code`, **bold**, bullet lines."""
    import re

    out = []
    for para in text.strip().split("\n\n"):
        esc = html.escape(para)
        esc = re.sub(r"`([^`]+)`", r"<code>\1</code>", esc)
        esc = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", esc)
        lines = esc.split("\n")
        if all(line.lstrip().startswith("- ") for line in lines if line.strip()):
            items = "".join(f"<li>{line.lstrip()[2:]}</li>" for line in lines if line.strip())
            out.append(f"<ul>{items}</ul>")
        else:
            out.append("<p>" + "<br>".join(lines) + "</p>")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee}code{background:#f5f5f5;padding:0 3px}
.caption{color:#555;font-size:90%}.meta td{text-align:left}
"""


@dataclasses.dataclass
class Report:
    """A results document written both as Markdown (PNGs beside it) and as self-contained HTML."""

    title: str
    intro: str = ""
    sections: list[Section] = dataclasses.field(default_factory=list)
    meta: dict[str, str] = dataclasses.field(default_factory=dict)

    def add(self, title: str, text: str = "", *items: Table | Figure | str) -> Section:
        section = Section(title, text, list(items))
        self.sections.append(section)
        return section

    def figures(self) -> list[Figure]:
        return [it for s in self.sections for it in s.items if isinstance(it, Figure)]

    def markdown(self, figure_dir: str) -> str:
        """figure_dir: path of the PNG folder relative to the Markdown file."""
        parts = [f"# {self.title}", "", "_Generated by the script; do not edit by hand._", ""]
        if self.intro:
            parts += [self.intro.strip(), ""]
        for s in self.sections:
            parts += [f"## {s.title}", ""]
            if s.text:
                parts += [s.text.strip(), ""]
            for it in s.items:
                if isinstance(it, Table):
                    parts += [it.markdown(), ""]
                elif isinstance(it, Figure):
                    parts += [f"![{it.caption or it.name}]({figure_dir}/{it.name}.png)", ""]
                    if it.caption:
                        parts += [f"_{it.caption}_", ""]
                else:
                    parts += [str(it).strip(), ""]
        if self.meta:
            parts += ["## Run", "", Table(["", ""], [[k, v] for k, v in self.meta.items()]).markdown(), ""]
        return "\n".join(parts).rstrip() + "\n"

    def html(self) -> str:
        parts = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        if self.intro:
            parts.append(_md_inline(self.intro))
        for s in self.sections:
            parts.append(f"<h2>{html.escape(s.title)}</h2>")
            if s.text:
                parts.append(_md_inline(s.text))
            for it in s.items:
                if isinstance(it, Table):
                    parts.append(it.html())
                elif isinstance(it, Figure):
                    b64 = base64.b64encode(it.png).decode("ascii")
                    alt = html.escape(it.caption or it.name)
                    parts.append(f"<figure><img alt='{alt}' src='data:image/png;base64,{b64}'>")
                    if it.caption:
                        parts.append(f"<figcaption class='caption'>{html.escape(it.caption)}</figcaption>")
                    parts.append("</figure>")
                else:
                    parts.append(_md_inline(str(it)))
        if self.meta:
            rows = "".join(
                f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in self.meta.items()
            )
            parts.append(f"<h2>Run</h2><table class='meta'>{rows}</table>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, md_path: Path | str, html_path: Path | str | None = None) -> list[Path]:
        """Write <md_path> and its figures into <stem>_figures/ beside it (and the HTML if asked)."""
        md_path = Path(md_path)
        md_path.parent.mkdir(parents=True, exist_ok=True)
        fig_dir = md_path.parent / f"{md_path.stem}_figures"
        written = []
        if self.figures():
            fig_dir.mkdir(exist_ok=True)
            for f in self.figures():
                p = fig_dir / f"{f.name}.png"
                p.write_bytes(f.png)
                written.append(p)
        md_path.write_text(self.markdown(fig_dir.name))
        written.append(md_path)
        if html_path is not None:
            html_path = Path(html_path)
            html_path.parent.mkdir(parents=True, exist_ok=True)
            html_path.write_text(self.html())
            written.append(html_path)
        return written


def log(msg: str) -> None:
    """Progress line on the terminal, with the time, flushed at once."""
    now = dt.datetime.now().strftime("%H:%M:%S")
    print(f"[{now}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Exact soft-optimal values of the dense_reward task (its reference and reward depend only on the
# previous letter and the response index, so V*(s) is a table over (letter, index)).
# ----------------------------------------------------------------------------------------------


def dense_optimal_values(task: Any, beta: float) -> np.ndarray:
    """V*(prev letter, t) for t = 0..max_len+1 by backward induction (PAPER.md §2), float64 [16, T+2].

    V*(s) = β log Σ_a π_ref(a|s) exp((r(s,a) + V*(s a))/β), with EOS terminal (reward 0, V = 0).
    """
    from dpoq_jax.data import synthetic as syn

    _, W = task._tables()
    n, T = syn.N_LETTERS, task.max_len
    V = np.zeros((n, T + 2))
    for t in range(T, -1, -1):
        extra = task.bonus if t < task.gold_len_limit else -task.length_penalty
        for prev in range(n):
            p = task.reference_next_probs(prev, t)
            p_letters = p[syn.LETTER0 : syn.LETTER0 + n]
            terms = [np.log(p[syn.EOS_ID]) if p[syn.EOS_ID] > 0 else -np.inf]
            with np.errstate(divide="ignore"):
                terms += list(np.log(p_letters) + (W[prev] + extra + V[:, t + 1]) / beta)
            V[prev, t] = beta * np.logaddexp.reduce(np.array(terms))
    return V


def dense_shaping(task: Any, prompt: str, response_ids: Sequence[int], V: np.ndarray) -> np.ndarray:
    """Per-token shaping V*(s_{t+1}) − V*(s_t) along a response (EOS leads to the terminal V = 0).

    The optimal implicit reward is β log π*/π_ref = r(s_t,a_t) + V*(s_{t+1}) − V*(s_t) (Eq. 10).
    """
    from dpoq_jax.data import synthetic as syn

    prev = task._prev_letter(prompt)
    out = []
    for t, tok in enumerate(int(x) for x in response_ids):
        v_now = V[prev, t]
        if tok == syn.EOS_ID:
            out.append(-v_now)
            break
        if not syn.LETTER0 <= tok < syn.LETTER0 + syn.N_LETTERS:
            raise ValueError(f"dense_shaping: token {tok} at response index {t} is not a letter or EOS")
        prev = tok - syn.LETTER0
        out.append(V[prev, t + 1] - v_now)
    return np.array(out)


# ----------------------------------------------------------------------------------------------
# Glue to the library: command-line arguments, training runs, models, scoring and decoding.
# Each function is a thin call into dpoq_jax (train loop, checkpoints, decode); nothing is redone here.
# ----------------------------------------------------------------------------------------------


def default_config(task: str) -> str:
    """The training engineer's tiny CPU configs for a synthetic task, as a prefix: PREFIX_sft.py and
    PREFIX_dpo.py (relative to the repository root)."""
    return str((CONFIGS_DIR / task).relative_to(REPO_ROOT))


def synthetic_overrides(task: str, config: str) -> list[str]:
    """Settings the experiments need on top of the tiny default configs.

    dense_reward responses run to max_len letters + EOS (33 tokens); the default response_len (12)
    would truncate the long responses whose length the experiment is about. Two reference samples of
    a pair can be identical (short responses): such pairs carry no preference and are skipped.
    """
    if config != default_config(task) or task != "dense_reward":
        return []
    task_obj = make_task(task)
    R = task_obj.max_len + 2
    return [
        f"--config.data.response_len={R}",
        f"--config.data.seq_len={R + 8}",
        "--config.data.on_error=skip",
    ]


def stage_config(config: str, stage: str) -> str:
    """The config spec of one stage: PREFIX_<stage>.py[:arg] if it exists (config = PREFIX[:arg]),
    else FILE.py:<stage> (one file whose get_config(arg) takes the stage)."""
    base, _, arg = config.partition(":")
    for root in (Path(base), REPO_ROOT / base):
        candidate = Path(f"{root}_{stage}.py")
        if candidate.exists():
            return f"{candidate}:{arg}" if arg else str(candidate)
    if base.endswith(".py") and Path(base).exists() and not arg:
        return f"{base}:{stage}"
    raise FileNotFoundError(f"--config {config!r}: no {base}_{stage}.py and no config file {base!r}")


def at_scale(args: Any, task: str) -> bool:
    """True when the user named their own configs: their step counts and eval cadence are kept."""
    return args.config != default_config(task)


def peek_config(config: str, stage: str, overrides: Sequence[str] = ()) -> Any:
    """A stage's config with the overrides applied but not validated (paths may not exist yet)."""
    from dpoq_jax.train.config import apply_override, load_config_file, parse_overrides

    cfg = load_config_file(stage_config(config, stage))
    for key, value in parse_overrides(list(overrides)):
        apply_override(cfg, key, value)
    return cfg


def require_synthetic(config: str, overrides: Sequence[str], task: str, experiment: str) -> None:
    """Experiments that need a gold judge or known error positions run on the synthetic task only."""
    cfg = peek_config(config, "dpo", overrides)
    if cfg.data.source != "synthetic" or cfg.data.task != task:
        raise SystemExit(
            f"{experiment} needs the synthetic {task!r} task (its gold judge / known answers); config "
            f"{config!r} trains on data.source={cfg.data.source!r}. At scale see the README's "
            "Experiments section (dpoq train + dpoq score / dpoq generate)."
        )


def experiment_parser(
    name: str, doc: str, task: str, parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """The options every experiment takes; its runs go to runs/experiments/<task>, shared by the
    experiments on the same task, so a finished run with the same settings (e.g. the SFT reference)
    is trained once."""
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{name}", description=doc.split("\n\n")[0], parents=list(parents)
    )
    parser.add_argument("--quick", action="store_true", help="small smoke-test version (minutes)")
    parser.add_argument(
        "--config",
        default=default_config(task),
        help="training configs: PREFIX[:arg] (PREFIX_sft.py, PREFIX_dpo.py) or FILE.py taking the stage",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and sampling")
    parser.add_argument("--workdir", default=f"runs/experiments/{task}", help="where the training runs go")
    parser.add_argument("--results", default=str(RESULTS_DIR / f"{name}.md"), help="results Markdown file")
    return parser


def parse_experiment_args(
    parser: argparse.ArgumentParser, argv: Sequence[str], name: str, task: str
) -> argparse.Namespace:
    """Parse argv; adds args.overrides (the task's needed settings, then the user's config overrides)
    and args.command (the command line that reproduces the run)."""
    args, rest = parser.parse_known_args(argv)
    args.overrides = synthetic_overrides(task, args.config) + check_overrides(rest, parser)
    args.command = command_line(f"experiments.{name}", argv)
    return args


def check_overrides(rest: Sequence[str], parser: Any) -> list[str]:
    """Unknown arguments must be config overrides (--config.key=value), passed to every training run;
    anything else is a usage error naming the argument."""
    from dpoq_jax.train.config import ConfigError, parse_overrides

    try:
        parse_overrides(rest)
    except ConfigError as e:
        parser.error(str(e))
    return list(rest)


def make_task(name: str, seed: int = 0) -> Any:
    from dpoq_jax.data.synthetic import make_task as _make

    return _make(name, seed=seed)


def tokenize_pair(tok: Any, example: Any) -> Any:
    from dpoq_jax.data.tokenize import TokenizeConfig
    from dpoq_jax.data.tokenize import tokenize_pair as _tokenize

    return _tokenize(example, tok, TokenizeConfig())


def max_response_tokens(task: Any) -> int:
    """A generation limit that no correct response of the task exceeds (EOS included)."""
    return int(getattr(task, "max_len", getattr(task, "max_digits", 32))) + 1


def heldout_prompts(
    config: str, overrides: Sequence[str], task: str, n: int, seed: int
) -> tuple[list[list[int]], int]:
    """(prompt ids, generation limit) of n held-out prompts: the synthetic task's test split for the
    default configs (never seen in training), else the DPO config's held-out split (e.g. TL;DR)."""
    if config == default_config(task):
        t = make_task(task, seed=seed)
        pairs = t.preference_examples(n, split="test")
        return [t.tokenizer.encode(p.prompt) for p in pairs], max_response_tokens(t)
    from dpoq_jax.train.inputs import load_dataset

    cfg = peek_config(config, "dpo", overrides)
    data = load_dataset(cfg)
    if not data.eval:
        raise ValueError(f"config {config!r}: no held-out split (data.eval_path / data.eval_split)")
    return [list(p.prompt_ids) for p in data.eval[:n]], int(cfg.data.response_len)


def strip_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    ids = [int(t) for t in ids]
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def _pad_rows(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
) -> tuple[np.ndarray, list[int]]:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    T = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    rows = np.zeros((len(prompts), T), np.int32)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        rows[i, : len(p) + len(r)] = list(p) + list(r)
    return rows, [len(p) for p in prompts]


def response_logits(
    model: Any, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], max_floats: float = 2e8
) -> list[np.ndarray]:
    """Logits [R_i, V] of the states that predict each response token (for exact per-state sums).

    Batches hold at most `max_floats` logits (B·T·V), so a 50k vocabulary stays within memory.
    """
    import jax
    from flax import nnx

    from dpoq_jax.decode.core import forward_logits

    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, rows):
        return forward_logits(nnx.merge(graphdef, state), rows)

    V = int(model.unembedding()[0].shape[-1])
    T = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    batch = max(1, int(max_floats // (T * V)))
    out: list[np.ndarray] = []
    for s in range(0, len(prompts), batch):
        rows, lens = _pad_rows(prompts[s : s + batch], responses[s : s + batch])
        logits = np.asarray(f(state, rows), np.float32)
        for i, r in enumerate(responses[s : s + batch]):
            out.append(logits[i, lens[i] - 1 : lens[i] - 1 + len(r)])
    return out


def _responses(tokens: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    return [
        [int(t) for t, m in zip(row, mrow, strict=True) if m > 0]
        for row, mrow in zip(tokens, mask, strict=True)
    ]


def sample(
    model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, seed: int, temperature: float = 1.0
) -> list[list[int]]:
    """Responses (EOS included when emitted) sampled by dpoq_jax.decode.sampling."""
    from dpoq_jax.decode.sampling import SampleConfig, generate

    gen = generate(
        model, prompts, SampleConfig(max_new_tokens=max_new_tokens, temperature=temperature), seed=seed
    )
    return _responses(gen.tokens, gen.mask)


def beam_search(
    model: Any, prompts: Sequence[Sequence[int]], *, num_beams: int, max_new_tokens: int, batch: int = 64
) -> list[list[int]]:
    """The best beam per prompt from dpoq_jax.decode.beam (likelihood search, no length penalty)."""
    from dpoq_jax.decode.beam import BeamConfig
    from dpoq_jax.decode.beam import beam_search as _beam

    cfg = BeamConfig(num_beams=num_beams, max_new_tokens=max_new_tokens)
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch):
        gen = _beam(model, prompts[s : s + batch], cfg)
        out += _responses(gen.tokens[:, 0], gen.mask[:, 0])
    return out


def train_run(
    config: str,
    stage: str,
    workdir: Path | str,
    *,
    steps: int | None,
    seed: int,
    beta: float | None = None,
    init_from: Path | str | None = None,
    sft_responses: str | None = None,
    eval_every: int | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """One SFT or DPO run through dpoq_jax.train.loop.train; returns its workdir.

    init_from: a finished run's workdir to start from (policy and frozen reference); None = the SFT
    stage's own starting point (random init for the synthetic configs, the base model at scale).
    A workdir holding a finished run with exactly these settings is reused (so scripts and the demo
    share runs); one holding different settings is removed first, so the loop never resumes a stranger.
    """
    import json
    import shutil

    from dpoq_jax.train.config import load_config
    from dpoq_jax.train.loop import train

    workdir = Path(workdir).resolve()  # orbax wants absolute checkpoint paths
    ov = [f"--config.stage={stage}", f"--config.seed={seed}"]
    if steps is not None:  # None: the config's own num_steps (e.g. one epoch at scale)
        ov.append(f"--config.train.num_steps={steps}")
    if peek_config(config, stage, overrides).data.source == "synthetic":
        ov.append(f"--config.data.task_kwargs.seed={seed}")  # the task's data seed follows --seed too
    ov += ["--config.train.progress_bar=False", "--config.checkpoint.async_save=False"]
    if beta is not None:
        ov.append(f"--config.loss.beta={beta}")
    if sft_responses is not None:
        ov.append(f"--config.data.sft_responses={sft_responses}")
    if eval_every is not None:
        ov.append(f"--config.train.eval_every={eval_every}")
    ov += list(overrides)  # the user's; the starting point below is the experiment's, so it comes last
    if init_from is not None:
        ov += ["--config.model.init=checkpoint", f"--config.model.path={init_from}"]
    elif stage == "dpo":  # no SFT: start from what the SFT stage starts from (random init, or a base model)
        sft = peek_config(config, "sft", overrides)
        ov.append(f"--config.model.init={sft.model.init}")
        if sft.model.path:
            ov.append(f"--config.model.path={sft.model.path}")
    spec = stage_config(config, stage)
    cfg = load_config(spec, ov)
    # The resolved config, not just its file name: a config file edited since is a different run.
    settings = {"config": spec, "overrides": ov, "resolved": json.loads(cfg.to_json())}
    if init_from is not None:  # a retrained starting run makes this one stale too
        init_marker = Path(init_from) / "experiment_run.json"
        settings["init_from"] = json.loads(init_marker.read_text()) if init_marker.exists() else None
    marker = workdir / "experiment_run.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        log(f"  reusing finished run {workdir}")
        return workdir
    if workdir.exists():
        old = json.loads(marker.read_text()) if marker.exists() else None
        if old is None:
            why = "unfinished run"
        else:
            changed = sorted(_diff_keys(old.get("resolved", {}), settings["resolved"]))
            why = f"settings changed: {', '.join(changed) or 'overrides'}"
        log(f"  replacing {workdir}: {why}")
        shutil.rmtree(workdir)
    t0 = dt.datetime.now()
    metrics = train(cfg, str(workdir)).metrics
    secs = (dt.datetime.now() - t0).total_seconds()
    shown = {k: v for k, v in metrics.items() if k in ("loss", "eval/loss", "eval/rewards/accuracies")}
    log(f"  {stage} run done in {secs:.0f}s: " + ", ".join(f"{k} {float(v):.4f}" for k, v in shown.items()))
    marker.write_text(json.dumps(settings, indent=1))
    return workdir


def train_sft(args: argparse.Namespace, responses: str, steps: int | None) -> Path:
    """An experiment's SFT reference, trained on the task's `responses` ("chosen" or "all") in
    <args.workdir>/sft_<responses>."""
    return train_run(
        args.config,
        "sft",
        Path(args.workdir) / f"sft_{responses}",
        steps=steps,
        seed=args.seed,
        sft_responses=responses,
        overrides=args.overrides,
    )


def train_dpo(
    args: argparse.Namespace,
    beta: float,
    steps: int | None,
    init_from: Path | None,
    eval_every: int | None = None,
) -> Path:
    """A DPO run from a finished SFT run (None: from the SFT stage's own starting point) in
    <args.workdir>/dpo_beta<β>_<SFT run's folder name, or "random">: one naming for all experiments,
    so those sharing a workdir share their finished runs."""
    start = "random" if init_from is None else Path(init_from).name
    return train_run(
        args.config,
        "dpo",
        Path(args.workdir) / f"dpo_beta{beta}_{start}",
        steps=steps,
        seed=args.seed,
        beta=beta,
        init_from=init_from,
        eval_every=eval_every,
        overrides=args.overrides,
    )


def run_meta(args: argparse.Namespace) -> dict[str, str]:
    """The "Run" table of an experiment's report: how to reproduce it, and where it ran."""
    return {"command": args.command, "seed": str(args.seed), "config": args.config, **machine_info()}


def write_report(name: str, report: Report, md_path: Path | str) -> int:
    """Write an experiment's results (Markdown and figures) and say where; the script's exit code."""
    paths = report.write(md_path)
    log(f"{name}: wrote {', '.join(str(p) for p in paths)}")
    return 0


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return [prefix or "<root>"] if a != b else []
    out = []
    for k in sorted(set(a) | set(b)):
        out += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
    return out


def load_model(workdir: Path | str, which: str = "policy") -> Any:
    """A finished run's final policy (its Hugging Face export) or, for which="initial", the policy it
    started from (= its frozen reference): rebuilt from the run's config.json."""
    from dpoq_jax.models import hf

    workdir = Path(workdir)
    if which == "policy":
        model, _ = hf.load_hf(str(workdir / "hf"))
        return model
    if which != "initial":
        raise ValueError(f"load_model: which must be 'policy' or 'initial', got {which!r}")
    import json

    import ml_collections as mc

    cfg = mc.ConfigDict(json.loads((workdir / "config.json").read_text()))
    if cfg.model.init == "checkpoint":
        return load_model(cfg.model.path)
    if cfg.model.init == "hf":
        model, _ = hf.load_hf(cfg.model.path)
        return model
    from dpoq_jax.train.loop import model_source

    if cfg.model.init != "random":
        raise ValueError(f"{workdir}/config.json: unknown model.init {cfg.model.init!r}")
    return model_source(cfg, None, None).make_model()  # mesh/rules are unused for random init


def eval_curve(workdir: Path | str, keys: Sequence[str]) -> list[dict[str, float]]:
    """The run's held-out metrics by step (metrics.jsonl, split "eval"); errors name missing keys."""
    from dpoq_jax.train.metrics import read_metrics

    rows = read_metrics(str(workdir), split="eval")
    if not rows:
        raise ValueError(f"{workdir}/metrics.jsonl has no eval rows (is train.eval_every > 0?)")
    out = []
    for r in rows:
        missing = [k for k in keys if k not in r]
        if missing:
            raise ValueError(f"{workdir}/metrics.jsonl step {r['step']}: eval row lacks {missing}")
        out.append({"step": r["step"], **{k: float(r[k]) for k in keys}})
    return out
