"""Credit-assignment reports: JSON, a self-contained HTML page, PNG heatmaps.

Report structure (also the JSON file):
    {"beta": float, "items": [{"prompt": str, "meta": {...},
                               "responses": {NAME: {"tokens": [str], "ids": [int], "logps": [...],
                                                    "ref_logps": [...], "rewards": [...],
                                                    "q": [...]?, "v": [...]?}}}]}
NAME is "chosen"/"rejected" for pairs (shown side by side) or "response" for single responses.
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

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.item { border-top: 1px solid #ccc; padding: 0.8em 0; }
.prompt { background: #f4f4f4; padding: 0.4em; white-space: pre-wrap; font-family: monospace; }
.pair { display: flex; gap: 1.5em; }
.col { flex: 1; min-width: 0; }
.tokens { font-family: monospace; white-space: pre-wrap; line-height: 1.9; }
.tok { padding: 1px 0; border-radius: 2px; }
.err { outline: 2px solid #000; }
.legend span { display: inline-block; width: 3.2em; text-align: center; font-size: 0.8em; }
"""


def _fmt(x: float) -> str:
    return f"{x:+.4f}"


def _marked(item: dict[str, Any], name: str) -> set[int]:
    """Token indices to outline: the injected errors of a rejected response (error-injection task)."""
    return set(item.get("meta", {}).get("error_positions", [])) if name == "rejected" else set()


def _tokens_html(r: dict[str, Any], scale: float, marked: set[int]) -> str:
    spans = []
    for j, (tok, tid, rew) in enumerate(zip(r["tokens"], r["ids"], r["rewards"], strict=True)):
        rgb = diverging_rgb(rew, scale)
        tip = f"#{j} id {tid} {tok!r}: reward {_fmt(rew)}" + (" (injected error)" if j in marked else "")
        for k, label in (("logps", "log π"), ("ref_logps", "log π_ref"), ("q", "Q"), ("v", "V")):
            if k in r:
                tip += f", {label} {_fmt(r[k][j])}"
        spans.append(
            f'<span class="tok" style="background:rgb{rgb}" title="{html.escape(tip)}">'
            f"{html.escape(tok)}</span>"
        )
    return "".join(spans)


def render_html(report: dict[str, Any], title: str = "Per-token implicit rewards") -> str:
    """Self-contained page: each response's tokens on a red (−) / white / blue (+) scale, values on hover."""
    validate(report)
    scale = _scale(report)
    legend = "".join(
        f'<span style="background:rgb{diverging_rgb(v * scale, scale)}">{v * scale:+.2g}</span>'
        for v in np.linspace(-1, 1, 9)
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>β = {report.get('beta', float('nan'))}. Reward r_t = β(log π − log π_ref) of each token. "
        "Hover a token for its values.</p>",
        f'<p class="legend">{legend}</p>',
        "<p>Outlined tokens: injected errors (when the data says where they are).</p>",
    ]
    for i, item in enumerate(report["items"]):
        parts.append(f'<div class="item" id="item-{i}">')
        meta = item.get("meta") or {}
        head = f"Example {i}" + (f" — {html.escape(json.dumps(meta, ensure_ascii=False))}" if meta else "")
        parts.append(f"<h2>{head}</h2>")
        parts.append(f'<div class="prompt">{html.escape(item["prompt"])}</div>')
        parts.append('<div class="pair">')
        for name, r in item["responses"].items():
            total = sum(r["rewards"])
            parts.append(f'<div class="col"><h3>{html.escape(name)} (Σ reward {_fmt(total)})</h3>')
            parts.append(f'<div class="tokens">{_tokens_html(r, scale, _marked(item, name))}</div></div>')
        parts.append("</div></div>")
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
            color = "white" if abs(rew) > 0.6 * scale else "black"  # readable on saturated cells
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
