"""`dpoq demo --quick` as a user runs it: from a wheel installed into a fresh venv, in a folder outside
the repository. One demo run (module fixture) feeds the tests: it ran from the installed package,
its report has its tables, figures and verdicts, the commands it prints work, and both pages (the
demo report and a `dpoq score` page) render in a real headless browser."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    return proc


@pytest.fixture(scope="module")
def installed_demo(tmp_path_factory) -> dict:
    """Build the wheel from a copy of the package sources, install it (no deps: they are this
    environment's) into a fresh venv, and run `dpoq demo --quick` with cwd outside the repository."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"  # setuptools builds in the source tree (build/, *.egg-info): build a copy
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "dpoq_jax", src / "dpoq_jax", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HOME"] = str(root)  # pip's cache and anything else keyed on HOME stay in tmp_path
    env["PIP_NO_CACHE_DIR"] = "1"
    wheels = root / "wheels"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            ".",
        ],
        src,
        env,
    )
    (wheel,) = wheels.glob("dpoq_jax-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    py, dpoq = venv / "bin" / "python", venv / "bin" / "dpoq"
    # The dependencies are this interpreter's, whether it is a system python or a virtualenv's (a
    # --system-site-packages venv made from a virtualenv would see the base interpreter's packages
    # instead): a .pth file puts this interpreter's site-packages after the venv's own, so the wheel
    # installed into the venv is the dpoq_jax that imports. pip comes from there too.
    inner = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], root,
                      env).stdout.strip())  # fmt: skip
    outer = dict.fromkeys([*site.getsitepackages(), *(sysconfig.get_path(k) for k in ("purelib", "platlib"))])
    (inner / "outer_site_packages.pth").write_text("".join(f"{d}\n" for d in outer if Path(d).is_dir()))
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], root, env)
    work = root / "user"  # a user's folder: no repository anywhere above it
    work.mkdir()
    where = _run([str(py), "-c", "import dpoq_jax; print(dpoq_jax.__file__)"], work, env).stdout.strip()
    proc = _run([str(dpoq), "demo", "--quick", "--out", "demo"], work, env)
    return {
        "wheel": wheel,
        "dpoq": dpoq,
        "cwd": work,
        "env": env,
        "out": work / "demo",
        "where": where,
        **vars(proc),
    }


@pytest.mark.slow
def test_wheel_holds_the_demo_and_it_runs_outside_the_repository(installed_demo) -> None:
    names = zipfile.ZipFile(installed_demo["wheel"]).namelist()
    assert "dpoq_jax/configs/synthetic.py" in names
    assert "dpoq_jax/experiments/credit_assignment.py" in names and "dpoq_jax/demo.py" in names
    assert not any(n.startswith(("experiments/", "tests/")) for n in names)
    # The demo imported the installed package, not the repository (or its editable install).
    assert Path(installed_demo["where"]).is_relative_to(installed_demo["dpoq"].parents[1])
    out = installed_demo["out"].resolve()
    assert f"Report:  {out / 'report.html'}" in installed_demo["stdout"]
    assert (out / "report.html").is_file() and (out / "report.md").is_file()


@pytest.mark.slow
def test_demo_report_contents(installed_demo) -> None:
    out = installed_demo["out"]
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # Self-contained: every image is inline PNG data that decodes to a PNG, nothing is fetched.
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) >= 3  # heatmap, training curves, beam curves (the β sweep plot needs 2+ β)
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    assert "http://" not in page and "https://" not in page
    for needle in (
        "top-1 localisation",
        "reference alone",
        "uniform random",
        "§5 identity",
        "win rate",
        "length bias",
    ):
        assert needle in page, needle
    assert "The policies&#x27; own answers" in page or "The policies' own answers" in page
    assert "PAPER.md" not in page  # the paper's sections are cited by name, not a file the user lacks

    md = (out / "report.md").read_text()
    figs = re.findall(r"!\[[^\]]*\]\((report_figures/[^)]+\.png)\)", md)
    assert {"report_figures/heatmap.png", "report_figures/beams_biased.png"} <= set(figs)
    assert all((out / f).read_bytes()[:4] == b"\x89PNG" for f in figs)
    # Tables made it into the summary: the credit-assignment rows, one row per beam width, the policies'
    # own answers. One seed (--quick): point estimates, said so.
    iv, siv = r"[0-9.]+ \[[0-9.]+, [0-9.]+\]", r"-?[0-9.]+ \[-?[0-9.]+, -?[0-9.]+\]"  # item intervals
    assert re.search(rf"\| DPO implicit reward \(−r_t\) \| {iv} \| {iv} \|", md)
    # beam rows: the length penalty α (0 unless a scale sets others), then win rate, gold, gold per letter
    # (over answers with a letter: one answer gives no interval), length
    beam2 = rf"\| DPO β=0\.3 \| biased \| beam 2 \| 0 \| {iv} \| {siv} \| (?:{siv}|-?[0-9.]+|nan) \| {iv} \|"
    assert re.search(beam2, md)
    assert re.search(rf"\| reference \(SFT\) \| greedy \| {iv} \| {iv} \|", md)
    assert "| total |" in md and "One seed (0): statistics of held-out prompts carry" in md
    # Numbered sections, each number once; one verdict per claim section, as in the at-a-glance table.
    numbers = re.findall(r"^#{2,3} ([0-9.]+)\. ", md, flags=re.M)
    assert len(numbers) == len(set(numbers)) and numbers[:2] == ["1", "2"] and "2.1" in numbers
    verdicts = re.findall(r"^\*\*Verdict: (holds|partly|does not hold)\.\*\* (.+)$", md, flags=re.M)
    # + the credit-assignment part's sub-verdict on the policy's own answers (DPO − reference, paired)
    answers = [v for v, why in verdicts if "greedy gold score DPO − reference (paired" in why]
    assert len(verdicts) == 4 and len(answers) == 1
    glance = re.findall(r"^\| ([234]) \| [^|]+ \| (holds|partly|does not hold) \|$", md, flags=re.M)
    assert [v for _, v in glance] == [v for v, why in verdicts if "greedy gold score DPO" not in why]
    # The beam verdict reads its numbers: the win-rate gain and the length change from 1 to 2 beams.
    assert re.search(
        r"β=0\.3, α=0: 2 beams − 1 beam win rate -?[0-9.]+ \[[^]]+\]; "
        r"length at 2 − at 1 beam -?[0-9.]+ \[[^]]+\] letters",
        md,
    )
    assert "`r:` reverse" in md and "`a:` add one" in md  # the heatmap's prompt codes explained


@pytest.mark.slow
def test_printed_next_steps_run(installed_demo) -> None:
    """The demo ends with dpoq score / generate / convert commands on the run folders it wrote; each
    runs as printed (from the demo's folder) and writes what it names."""
    tail = installed_demo["stdout"].split("Try next", 1)[1]
    cmds = [shlex.split(line.strip()) for line in tail.splitlines() if line.strip().startswith("dpoq ")]
    assert [c[1] for c in cmds] == ["score", "generate", "convert"]
    dpoq = str(installed_demo["dpoq"])
    for cmd in cmds:
        runs = [
            a
            for flag, a in zip(cmd, cmd[1:], strict=False)
            if flag in ("--policy", "--reference", "--model", "--from")
        ]
        assert runs and all(Path(installed_demo["cwd"], r).exists() for r in runs), cmd
        _run([dpoq, *cmd[1:]], installed_demo["cwd"], installed_demo["env"], timeout=600)
    out = installed_demo["out"]
    assert (out / "score" / "report.html").is_file() and (out / "beams.jsonl").stat().st_size > 0
    assert (out / "export_hf" / "config.json").is_file()


# ---------------------------------------------------------------------------------- headless browser

_CHECK_JS = """
<script>
// Synchronous on 'load' (every image has loaded or failed by then): an async handler can lose the
// race with --dump-dom, which serialises the page once loading is done.
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.querySelectorAll('details').forEach(d => d.open = true);  // hidden pages count too
  const err = document.querySelector('.tok.err');
  const r = {
    images: imgs.length,
    decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    outlined: document.querySelectorAll('.tok.err').length,
    outline: err ? getComputedStyle(err).outlineStyle + ' ' + getComputedStyle(err).outlineWidth : '',
    scrollWidth: document.documentElement.scrollWidth,
    innerWidth: window.innerWidth,
  };
  const pre = document.createElement('pre');
  pre.id = 'dpoq-check';
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>
"""


def browser_check(page: Path, tmp_path: Path, width: int) -> dict:
    """Open a copy of `page` in headless Chromium at `width` px and return what the injected script
    measured (images decoded, outlined tokens, page width against the window)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium package)")
    copy = tmp_path / f"check_{page.parent.name}_{width}.html"
    copy.write_text(page.read_text().replace("</body>", _CHECK_JS + "</body>"))
    profile = tmp_path / "chromium-profile"
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--no-first-run",
        "--disable-crash-reporter",
        f"--user-data-dir={profile}",
        f"--window-size={width},900",
        "--virtual-time-budget=20000",
        "--dump-dom",
        copy.as_uri(),
    ]
    env = dict(os.environ, HOME=str(tmp_path))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    m = re.search(r'<pre id="dpoq-check">(.*?)</pre>', proc.stdout)
    assert m, f"no check result from {page} (chromium exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    return json.loads(m[1].replace("&quot;", '"').replace("&amp;", "&"))


@pytest.mark.slow
@pytest.mark.parametrize("width", [1280, 800])
def test_pages_render_in_a_browser(installed_demo, tmp_path, width) -> None:
    demo = browser_check(installed_demo["out"] / "report.html", tmp_path, width)
    assert demo["images"] >= 3 and demo["decoded"] == demo["images"], demo
    assert demo["scrollWidth"] <= demo["innerWidth"], demo

    score_page = installed_demo["out"] / "score" / "report.html"
    if not score_page.exists():  # written by test_printed_next_steps_run; run its score command here
        test_printed_next_steps_run(installed_demo)
    score = browser_check(score_page, tmp_path, width)
    assert score["decoded"] == score["images"], score
    n_errors = sum(
        len(it["meta"]["error_positions"])
        for it in json.loads((score_page.parent / "scores.json").read_text())["items"]
    )
    assert score["outlined"] == n_errors > 0 and score["outline"].startswith("solid"), score
    assert score["scrollWidth"] <= score["innerWidth"], score


def test_browser_check_catches_a_broken_page(tmp_path) -> None:
    """The browser check can fail: an image that does not decode and an element wider than the
    window are reported as such."""
    page = tmp_path / "bad" / "report.html"
    page.parent.mkdir()
    page.write_text(
        "<!DOCTYPE html><html><body><img src='data:image/png;base64,AAAA'>"
        "<div style='width:3000px'>wide</div><span class='tok err'>x</span></body></html>"
    )
    got = browser_check(page, tmp_path, 800)
    assert (got["images"], got["decoded"], got["outlined"]) == (1, 0, 1), got
    assert got["scrollWidth"] > got["innerWidth"], got
