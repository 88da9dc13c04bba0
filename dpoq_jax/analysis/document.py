"""Results documents of the experiments and the demo: tables, figures, verdicts, Markdown and HTML.

A `Report` is written both as Markdown (PNGs in a folder beside it) and as one self-contained HTML
page (PNGs inline). Sections are numbered when rendered (1, 1.1, 2, ...), so a document assembled
from several experiments never repeats a number. A section may end with a `Verdict` on the claim it
tests (holds / partly / does not hold, and why), computed by the experiment from its own numbers.
(`analysis.report` renders the other page, the per-token scores of `dpoq score`.)
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import html
import io
import math
import os
import platform
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

VERDICTS = ("holds", "partly", "does not hold")


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
        body = "".join("<tr>" + "".join(_td(c) for c in row) + "</tr>" for row in self.rows)
        cap = f"<p class='caption'>{html.escape(self.caption)}</p>" if self.caption else ""
        # The wrapper scrolls a wide table inside the page instead of widening the page.
        table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        return f"<div class='table'>{table}</div>{cap}"


def _td(cell: Any) -> str:
    """A table cell: numbers right-aligned (the CSS default), prose left-aligned."""
    text = fmt(cell)
    prose = isinstance(cell, str) and re.fullmatch(r"[-+0-9.,\[\] →e]*", text) is None
    return f"<td class='text'>{html.escape(text)}</td>" if prose else f"<td>{html.escape(text)}</td>"


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


def text_colour(rgb: Sequence[float]) -> str:
    """ "white" or "black", whichever contrasts more with a background of sRGB colour `rgb` (0..1
    floats): by WCAG relative luminance L, the contrast ratios with white and black are equal at
    L = 0.179."""
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in list(rgb)[:3]]
    luminance = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    return "white" if luminance < 0.179 else "black"


@dataclasses.dataclass
class Verdict:
    """Whether a claim held in these numbers: status in VERDICTS, `why` one line of the numbers."""

    claim: str
    status: str
    why: str

    def __post_init__(self) -> None:
        if self.status not in VERDICTS:
            raise ValueError(f"Verdict status must be one of {VERDICTS}, got {self.status!r}")

    def markdown(self) -> str:
        return f"**Verdict: {self.status}.** {self.why}"

    def html(self) -> str:
        cls = self.status.replace(" ", "-")
        return (
            f"<p class='verdict {cls}'><b>Verdict: {html.escape(self.status)}.</b> "
            f"{_md_spans(html.escape(self.why))}</p>"
        )


def grade(checks: Sequence[tuple[bool, str]]) -> tuple[str, str]:
    """(status, why) from (passed, sentence) checks: holds if all passed, does not hold if none."""
    passed = sum(ok for ok, _ in checks)
    status = "holds" if passed == len(checks) else "does not hold" if passed == 0 else "partly"
    return status, "; ".join(text for _, text in checks) + "."


@dataclasses.dataclass
class Section:
    title: str
    text: str = ""
    items: list[Table | Figure | str] = dataclasses.field(default_factory=list)
    level: int = 1  # 1: numbered 1, 2, ...; 2: numbered 1.1, 1.2, ... under the last level-1 section
    verdict: Verdict | None = None  # rendered as the section's last line


def _md_spans(esc: str) -> str:
    esc = re.sub(r"`([^`]+)`", r"<code>\1</code>", esc)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", esc)


def _md_inline(text: str) -> str:
    """Tiny Markdown -> HTML for prose: paragraphs, `code`, **bold**, bullet lines, ``` blocks."""
    out = []
    for para in text.strip().split("\n\n"):
        if para.startswith("```") and para.rstrip().endswith("```"):
            body = para.strip()[3:-3].strip("\n")
            out.append(f"<pre>{html.escape(body)}</pre>")
            continue
        lines = _md_spans(html.escape(para)).split("\n")
        if all(line.lstrip().startswith("- ") for line in lines if line.strip()):
            items = "".join(f"<li>{line.lstrip()[2:]}</li>" for line in lines if line.strip())
            out.append(f"<ul>{items}</ul>")
        else:
            out.append("<p>" + "<br>".join(lines) + "</p>")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;
line-height:1.45}
.table{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child,td.text{text-align:left}
img{max-width:100%;height:auto;border:1px solid #eee}figure{margin:1em 0}
code{background:#f5f5f5;padding:0 3px;overflow-wrap:anywhere}
pre{background:#f5f5f5;padding:.6em;white-space:pre-wrap;overflow-wrap:anywhere}
.caption{color:#555;font-size:90%}.meta td{text-align:left;overflow-wrap:anywhere}
.verdict{border-left:5px solid #888;background:#f7f7f7;padding:.4em .8em}
.verdict.holds{border-color:#2a8a3e}.verdict.partly{border-color:#c98a00}
.verdict.does-not-hold{border-color:#c0392b}
"""


INPUTS_TEXT = (
    "Every number the verdicts above read, in the order read: as judged (the interval the rule used) and, "
    "for a statistic of held-out items over several seeds, the two 95% intervals it is the wider of (the "
    "seed-level Student-t interval and the two-level bootstrap); — where a number has one interval only "
    "(a t-interval over seeds, or one seed's)."
)


@dataclasses.dataclass
class Report:
    """A results document written both as Markdown (PNGs beside it) and as self-contained HTML."""

    title: str
    intro: str = ""
    sections: list[Section] = dataclasses.field(default_factory=list)
    meta: dict[str, str] = dataclasses.field(default_factory=dict)
    verdict: Verdict | None = None  # the experiment's answer to the claim it tests (not rendered)
    run_dirs: dict[str, Path] = dataclasses.field(default_factory=dict)  # training runs behind it
    numbers: dict[str, Any] = dataclasses.field(default_factory=dict)  # named results the verdicts read
    inputs: Table | None = None  # the numbers the verdicts read, with both intervals (seeds.judge)

    def add(self, title: str, text: str = "", *items: Table | Figure | str, level: int = 1) -> Section:
        section = Section(title, text, list(items), level)
        self.sections.append(section)
        return section

    def figures(self) -> list[Figure]:
        return [it for s in self.sections for it in s.items if isinstance(it, Figure)]

    def numbered(self) -> list[tuple[str, Section]]:
        """(number, section): "1", "1.1", "1.2", "2", ..."""
        out, major, minor = [], 0, 0
        for s in self.sections:
            if s.level == 1:
                major, minor = major + 1, 0
                out.append((f"{major}", s))
            elif s.level == 2:
                minor += 1
                out.append((f"{max(major, 1)}.{minor}", s))
            else:
                raise ValueError(f"section {s.title!r}: level must be 1 or 2, got {s.level}")
        return out

    def markdown(self, figure_dir: str) -> str:
        """figure_dir: path of the PNG folder relative to the Markdown file."""
        parts = [f"# {self.title}", "", "_Generated by the script; do not edit by hand._", ""]
        if self.intro:
            parts += [self.intro.strip(), ""]
        pending: list[Verdict] = []  # a level-1 verdict waits until its level-2 sections are written
        for num, s in self.numbered():
            if s.level == 1:
                parts += [v.markdown() + "\n" for v in pending]
                pending = []
            parts += [f"{'#' * (s.level + 1)} {num}. {s.title}", ""]
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
            if s.verdict is not None:
                if s.level == 2:
                    parts += [s.verdict.markdown(), ""]
                else:
                    pending.append(s.verdict)
        parts += [v.markdown() + "\n" for v in pending]
        if self.inputs is not None and self.inputs.rows:
            parts += ["## Verdict inputs", "", INPUTS_TEXT, "", self.inputs.markdown(), ""]
        if self.meta:
            parts += ["## Run", "", Table(["", ""], [[k, v] for k, v in self.meta.items()]).markdown(), ""]
        return "\n".join(parts).rstrip() + "\n"

    def html(self) -> str:
        parts = [
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        if self.intro:
            parts.append(_md_inline(self.intro))
        pending: list[Verdict] = []
        for num, s in self.numbered():
            if s.level == 1:
                parts += [v.html() for v in pending]
                pending = []
            tag = f"h{s.level + 1}"
            parts.append(f"<{tag} id='s{num}'>{num}. {html.escape(s.title)}</{tag}>")
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
            if s.verdict is not None:
                if s.level == 2:
                    parts.append(s.verdict.html())
                else:
                    pending.append(s.verdict)
        parts += [v.html() for v in pending]
        if self.inputs is not None and self.inputs.rows:
            parts += ["<h2>Verdict inputs</h2>", _md_inline(INPUTS_TEXT), self.inputs.html()]
        if self.meta:
            rows = "".join(
                f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in self.meta.items()
            )
            parts.append(f"<h2>Run</h2><div class='table'><table class='meta'>{rows}</table></div>")
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
        md_path.write_text(self.markdown(fig_dir.name), encoding="utf-8")
        written.append(md_path)
        if html_path is not None:
            html_path = Path(html_path)
            html_path.parent.mkdir(parents=True, exist_ok=True)
            html_path.write_text(self.html(), encoding="utf-8")
            written.append(html_path)
        return written


# ------------------------------------------------------------------------------------ run facts


def log(msg: str) -> None:
    """Progress line on the terminal, with the time, flushed at once."""
    now = dt.datetime.now().strftime("%H:%M:%S")
    print(f"[{now}] {msg}", flush=True)


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


def code_commit() -> str:
    """The git commit of the dpoq_jax sources that ran (the verdict rules a report was judged by), with
    "+ local changes" when the tree differs from it; "unknown" outside a git checkout (an installed wheel)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()  # fmt: skip

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "..")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit} + local changes" if dirty else commit


def command_line(head: str, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, as a user would type it (`head`: e.g. "dpoq demo")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return " ".join([head] + [shlex.quote(a) for a in argv])
