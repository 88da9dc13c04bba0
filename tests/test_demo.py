"""`dpoq demo --quick` end to end: trains tiny models, writes the report with tables, plots, heatmap."""

from __future__ import annotations

import base64
import re

import pytest


@pytest.mark.slow
def test_demo_quick_writes_report(tmp_path, capsys) -> None:
    from dpoq_jax import cli

    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    html_path, md_path = out / "report.html", out / "report.md"
    assert str(html_path.resolve()) in printed and str(md_path.resolve()) in printed  # says where

    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # Self-contained: every image is inline PNG data that decodes to a PNG, nothing is fetched.
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) >= 3  # heatmap, training curves, beam curves (the β sweep plot needs 2+ β)
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    assert "http://" not in page and "https://" not in page
    for needle in ("top-1 localisation", "reference alone", "uniform random", "§5.4", "win rate", "95% CI"):
        assert needle in page, needle
    assert "heatmap" in page.lower()

    md = md_path.read_text()
    figs = re.findall(r"!\[[^\]]*\]\((report_figures/[^)]+\.png)\)", md)
    assert {"report_figures/heatmap.png", "report_figures/beams.png"} <= set(figs)
    assert all((out / f).read_bytes()[:4] == b"\x89PNG" for f in figs)
    # Tables made it into the summary: the credit-assignment rows and one row per beam width.
    assert re.search(r"\| DPO implicit reward \(−r_t\) \| [0-9.]+ \| [0-9.]+ \|", md)
    assert re.search(r"\| 0\.300 \| beam 2 \| [0-9.]+ \| \[[0-9.]+, [0-9.]+\] \|", md)
    assert "| total |" in md
