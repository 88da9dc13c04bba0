"""Credit-assignment reports: JSON, a self-contained HTML page, PNG heatmaps.

Report structure (also the JSON file):
    {"beta": float, "items": [{"prompt": str, "meta": {...},
                               "responses": {NAME: {"tokens": [str], "ids": [int], "logps": [...],
                                                    "ref_logps": [...], "rewards": [...],
                                                    "q": [...]?, "v": [...]?, "steps": {...}?}}}]}
NAME is "chosen"/"rejected" for pairs (shown side by side) or "response" for single responses.
"steps" (`dpoq score --steps`, analysis/text_steps.py): {"spec", "ranges": [[start, stop]], "texts",
"rewards", "min", "sum", "last", "mean"}; the page boxes each step and shows its reward.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpoq_jax.analysis.credit import TokenScores

REQUIRED = ("tokens", "ids", "rewards")


def make_item(
    prompt: str, responses: dict[str, tuple[TokenScores, Sequence[str]]], meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One report entry from scored responses and their display tokens (one string per token)."""
    out = {}
    for name, (scores, tokens) in responses.items():
        if len(tokens) != len(scores.ids):
            raise ValueError(f"response {name!r}: {len(tokens)} token strings for {len(scores.ids)} ids")
        out[name] = scores.to_dict(tokens)
    return {"prompt": prompt, "meta": dict(meta or {}), "responses": out}


def validate(report: dict[str, Any], where: str = "report") -> None:
    if "items" not in report or not isinstance(report["items"], list):
        raise ValueError(f"{where}: missing key 'items' (a list)")
    for i, item in enumerate(report["items"]):
        for name, r in item.get("responses", {}).items():
            for k in REQUIRED:
                if k not in r:
                    raise ValueError(f"{where}: items[{i}].responses.{name} has no key {k!r}")
            n = len(r["ids"])
            for k, v in r.items():
                if isinstance(v, list) and len(v) != n:
                    raise ValueError(
                        f"{where}: items[{i}].responses.{name}.{k} has {len(v)} entries, ids {n}"
                    )


def save_json(report: dict[str, Any], path: str | Path) -> None:
    validate(report)
    Path(path).write_text(json.dumps(report, indent=1, ensure_ascii=False))


def load_json(path: str | Path) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    validate(report, str(path))
    return report


# ------------------------------------------------------------------------------------------ colours


def _scale(report: dict[str, Any]) -> float:
    """Symmetric colour range: the largest |reward| in the report (so colours compare across items)."""
    m = max(
        (abs(x) for it in report["items"] for r in it["responses"].values() for x in r["rewards"]),
        default=0.0,
    )
    return m if m > 0 else 1.0


def diverging_rgb(x: float, scale: float) -> tuple[int, int, int]:
    """Red for negative, white at 0, blue for positive; |x| >= scale is fully saturated."""
    a = max(-1.0, min(1.0, x / scale))
    if a < 0:  # white -> (214, 39, 40)
        c = (214, 39, 40)
    else:  # white -> (31, 119, 180)
        c = (31, 119, 180)
    t = abs(a)
    return tuple(round(255 + (ci - 255) * t) for ci in c)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- HTML

PAGE_SIZE = 25  # examples per collapsible page: 256 examples stay navigable

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em;
       color: #222; line-height: 1.4; }
.item { border-top: 1px solid #ccc; padding: 0.6em 0; }
.item h2 { font-size: 1.05em; margin: 0.2em 0; }
.sub { color: #555; font-size: 0.9em; margin: 0.2em 0 0.4em; overflow-wrap: anywhere; }
.prompt { background: #f4f4f4; padding: 0.4em; white-space: pre-wrap; font-family: monospace;
          overflow-wrap: anywhere; }
.pair { display: flex; flex-wrap: wrap; gap: 1.5em; }
.col { flex: 1 1 20em; min-width: 0; }
.col h3 { font-size: 0.95em; margin: 0.5em 0 0.2em; }
.tokens { font-family: monospace; font-size: 1.15em; white-space: pre-wrap; overflow-wrap: anywhere;
          line-height: 2.1; }
.tok { padding: 1px 2px; margin-right: 2px; border-radius: 2px; }
.err { outline: 2px solid #000; outline-offset: 1px; }
.step { border: 1px solid #777; border-radius: 4px; padding: 3px 1px; margin-right: 3px; }
.step sup { font-size: 0.65em; color: #333; padding: 0 2px; }
.legend span { display: inline-block; width: 3.2em; text-align: center; font-size: 0.8em; }
.index { display: flex; flex-wrap: wrap; gap: 3px; margin: 0.5em 0 1em; }
.index a { display: inline-block; min-width: 2.4em; text-align: center; font-size: 0.75em;
           padding: 1px 2px; border-radius: 3px; text-decoration: none; border: 1px solid #ddd; }
details.page > summary { cursor: pointer; font-weight: 600; padding: 0.3em 0; }
"""


def _fmt(x: float) -> str:
    return f"{x:+.4f}"


def _marked(item: dict[str, Any], name: str) -> set[int]:
    """Token indices to outline: the injected errors of a rejected response (error-injection task)."""
    return set(item.get("meta", {}).get("error_positions", [])) if name == "rejected" else set()


def _text_on(rgb: tuple[int, int, int]) -> str:
    from dpoq_jax.analysis.document import text_colour

    return "#fff" if text_colour([c / 255 for c in rgb]) == "white" else "#000"


def _tokens_html(r: dict[str, Any], scale: float, marked: set[int]) -> str:
    spans = []
    for j, (tok, tid, rew) in enumerate(zip(r["tokens"], r["ids"], r["rewards"], strict=True)):
        rgb = diverging_rgb(rew, scale)
        tip = f"#{j} id {tid} {tok!r}: reward {_fmt(rew)}" + (" (injected error)" if j in marked else "")
        for k, label in (("logps", "log π"), ("ref_logps", "log π_ref"), ("q", "Q"), ("v", "V")):
            if k in r:
                tip += f", {label} {_fmt(r[k][j])}"
        cls = "tok err" if j in marked else "tok"
        spans.append(
            f'<span class="{cls}" style="background:rgb{rgb};color:{_text_on(rgb)}" '
            f'title="{html.escape(tip)}">{html.escape(tok)}</span>'
        )
    steps = r.get("steps")
    if not steps:
        return "".join(spans)
    out = []  # each step boxed, its reward (Σ of its token rewards) after it
    for k, ((a, b), rew) in enumerate(zip(steps["ranges"], steps["rewards"], strict=True)):
        tip = html.escape(f"step {k}: tokens {a}–{b - 1}, step reward {_fmt(rew)}")
        out.append(f'<span class="step" title="{tip}">{"".join(spans[a:b])}<sup>{_fmt(rew)}</sup></span>')
    return "".join(out)


def _steps_text(r: dict[str, Any]) -> str:
    """The step aggregations of a response for its heading ("" without steps)."""
    s = r.get("steps")
    if not s:
        return ""
    return f"; {len(s['ranges'])} steps, " + ", ".join(f"{k} {_fmt(s[k])}" for k in ("min", "last", "mean"))


def _meta_text(meta: dict[str, Any]) -> str:
    """`key: value` pairs of an item's meta for its sub-heading (lists joined, floats rounded)."""
    parts = []
    for k, v in meta.items():
        if isinstance(v, (list, tuple)):
            v = ", ".join(str(x) for x in v) or "none"
        elif isinstance(v, float):
            v = f"{v:.3g}"
        parts.append(f"{k.replace('_', ' ')}: {v}")
    return " · ".join(parts)


def _summary(item: dict[str, Any]) -> tuple[str, float | None, bool | None]:
    """(one-line summary, margin or None, top-1 hit or None) of an item, for its heading and the index."""
    rs = item["responses"]
    bits, margin, hit = [], None, None
    if "chosen" in rs and "rejected" in rs:
        margin = sum(rs["chosen"]["rewards"]) - sum(rs["rejected"]["rewards"])
        bits.append(f"margin Σr(chosen) − Σr(rejected) = {_fmt(margin)}")
    marked = _marked(item, "rejected")
    if marked and rs.get("rejected", {}).get("rewards"):
        r = rs["rejected"]["rewards"]
        hit = int(np.argmin(r)) in marked
        bits.append(f"lowest-reward token {'is' if hit else 'is not'} an injected error")
    return "; ".join(bits), margin, hit


def _index_html(report: dict[str, Any], scale: float) -> str:
    """One small link per example, coloured by its margin (or total reward), with its summary on hover."""
    links = []
    for i, item in enumerate(report["items"]):
        summary, margin, hit = _summary(item)
        value = margin if margin is not None else sum(sum(r["rewards"]) for r in item["responses"].values())
        rgb = diverging_rgb(value, scale * 4)  # sums span more than one token's range
        mark = "" if hit is None else ("✓" if hit else "✗")
        tip = f"Example {i}" + (f": {summary}" if summary else "")
        links.append(
            f'<a href="#item-{i}" style="background:rgb{rgb};color:{_text_on(rgb)}" '
            f'title="{html.escape(tip)}">{i}{mark}</a>'
        )
    return f'<nav class="index">{"".join(links)}</nav>'


def render_html(report: dict[str, Any], title: str = "Per-token implicit rewards") -> str:
    """Self-contained page: an index of the examples, then each response's tokens on a red (−) / white /
    blue (+) scale in pages of PAGE_SIZE, injected errors outlined, values on hover."""
    validate(report)
    scale = _scale(report)
    legend = "".join(
        f'<span style="background:rgb{rgb};color:{_text_on(rgb)}">{v * scale:+.2g}</span>'
        for v in np.linspace(-1, 1, 9)
        for rgb in [diverging_rgb(v * scale, scale)]
    )
    items = report["items"]
    has_errors = any(it.get("meta", {}).get("error_positions") for it in items)
    hits = [h for h in (_summary(it)[2] for it in items) if h is not None]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(items)} examples; β = {report.get('beta', float('nan'))}. "
        "Reward r_t = β(log π − log π_ref) of each token. Hover a token for its values.</p>",
        f'<p class="legend">{legend}</p>',
    ]
    if has_errors:
        parts.append(
            '<p>Outlined tokens (<span class="err">like this</span>) are injected errors. The lowest-'
            f"reward token of the rejected response is an injected one in {sum(hits)} of {len(hits)} "
            "examples (✓ in the index).</p>"
        )
    parts.append(
        "<h2>Index</h2><p>Colour: the example's margin (chosen − rejected summed reward) or total reward. "
        "Click to jump.</p>" + _index_html(report, scale)
    )
    for start in range(0, len(items), PAGE_SIZE):
        stop = min(start + PAGE_SIZE, len(items))
        opened = " open" if start == 0 else ""
        parts.append(f'<details class="page"{opened}><summary>Examples {start}–{stop - 1}</summary>')
        for i in range(start, stop):
            item = items[i]
            summary, _, _ = _summary(item)
            parts.append(f'<div class="item" id="item-{i}">')
            parts.append(f"<h2>Example {i}</h2>")
            sub = "; ".join(x for x in (_meta_text(item.get("meta") or {}), summary) if x)
            if sub:
                parts.append(f'<p class="sub">{html.escape(sub)}</p>')
            parts.append(f'<div class="prompt">{html.escape(item["prompt"])}</div>')
            parts.append('<div class="pair">')
            for name, r in item["responses"].items():
                total = sum(r["rewards"])
                head = f"{name} (Σ reward {_fmt(total)}{_steps_text(r)})"
                parts.append(f'<div class="col"><h3>{html.escape(head)}</h3>')
                parts.append(f'<div class="tokens">{_tokens_html(r, scale, _marked(item, name))}</div></div>')
            parts.append("</div></div>")
        parts.append("</details>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts)


def write_html(report: dict[str, Any], path: str | Path, **kwargs: Any) -> None:
    Path(path).write_text(render_html(report, **kwargs), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- PNG

CELL_PX, ROW_PX, LEFT_PX, EXTRA_H_PX, DPI = 44, 56, 110, 70, 100


def png_size_px(n_tokens: int, n_rows: int) -> tuple[int, int]:
    """(width, height) in pixels of `write_png` for the longest response and the number of responses."""
    return LEFT_PX + CELL_PX * max(n_tokens, 1) + 60, ROW_PX * n_rows + EXTRA_H_PX


def write_png(item: dict[str, Any], path: str | Path, scale: float | None = None) -> tuple[int, int]:
    """Heatmap of one item: a row per response, a cell per token coloured by reward, token text inside
    (injected errors outlined). Returns the image size (width, height) in pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpoq_jax.analysis.document import text_colour

    names = list(item["responses"])
    rs = [item["responses"][n] for n in names]
    n_tok = max(len(r["rewards"]) for r in rs)
    w, h = png_size_px(n_tok, len(rs))
    if scale is None:
        scale = max((abs(x) for r in rs for x in r["rewards"]), default=0.0) or 1.0
    grid = np.full((len(rs), n_tok), np.nan)
    for i, r in enumerate(rs):
        grid[i, : len(r["rewards"])] = r["rewards"]
    fig = plt.figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    ax = fig.add_axes((LEFT_PX / w, 40 / h, CELL_PX * n_tok / w, ROW_PX * len(rs) / h))
    im = ax.imshow(
        np.ma.masked_invalid(grid),
        cmap="RdBu",
        vmin=-scale,
        vmax=scale,
        aspect="auto",
        interpolation="nearest",
    )
    for i, (name, r) in enumerate(zip(names, rs, strict=True)):
        marked = _marked(item, name)
        for j, (tok, rew) in enumerate(zip(r["tokens"], r["rewards"], strict=True)):
            color = text_colour(im.cmap(im.norm(rew)))  # white on dark cells, by the cell's luminance
            ax.text(
                j,
                i,
                tok if len(tok) <= 6 else tok[:5] + "…",
                ha="center",
                va="center",
                fontsize=8,
                color=color,
            )
            if j in marked:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2.5, ec="black"))
    ax.set_yticks(
        range(len(rs)),
        [f"{n}\nΣ {sum(r['rewards']):+.2f}" for n, r in zip(names, rs, strict=True)],
        fontsize=8,
    )
    ax.set_xticks(range(n_tok), [str(j) for j in range(n_tok)], fontsize=7)
    ax.set_xlabel("response token", fontsize=8)
    cax = fig.add_axes(((LEFT_PX + CELL_PX * n_tok + 4) / w, 40 / h, 6 / w, ROW_PX * len(rs) / h))
    fig.colorbar(im, cax=cax).ax.tick_params(labelsize=6)
    prompt = " ".join(item.get("prompt", "").split())  # one line: newlines would overflow the margin
    max_chars = max(10, (w - LEFT_PX) // 6)
    title = prompt if len(prompt) <= max_chars else prompt[: max_chars - 1] + "…"
    fig.text(LEFT_PX / w, 1 - 6 / h, title, va="top", ha="left", fontsize=8, family="monospace")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return w, h


def png_shape(path: str | Path) -> tuple[int, int]:
    """(width, height) read from a PNG's IHDR chunk."""
    data = Path(path).read_bytes()[:24]
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
