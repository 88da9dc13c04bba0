"""The documentation site builds in strict mode: a broken link, an anchor that does not exist, a page
left out of the navigation or a link to a missing repository file fails the suite."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_docs_build_strict(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    home = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert "Quick start" in home  # the README is the home page
    for page in ("core", "models", "data", "training", "decoding", "experiments", "benchmarks", "tpu", "cli"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page
    # the API page is rendered from the docstrings: every public function and class of the core
    # modules is on it, with the first line of its docstring
    import html
    import importlib
    import inspect

    api = html.unescape((tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8"))
    for mod_name in ("dpoq_jax.tokenq", "dpoq_jax.losses", "dpoq_jax.prm", "dpoq_jax.data.token_cache"):
        mod = importlib.import_module(mod_name)
        public = [n for n, o in vars(mod).items() if not n.startswith("_") and getattr(o, "__module__", "") ==
                  mod_name and callable(o)]  # fmt: skip
        assert len(public) >= 3, mod_name
        for name in public:
            assert f'id="{mod_name}.{name}"' in api, f"{mod_name}.{name} is not on the API page"
            first = (inspect.getdoc(getattr(mod, name)) or "").split("\n")[0].split("`")[0][:30]
            assert first and first in api, f"{mod_name}.{name}: docstring {first!r} not rendered"


def test_docs_build_fails_on_a_broken_link(tmp_path):
    """The strict build is a real check: the same build with one broken link fails."""
    import shutil

    work = tmp_path / "repo"  # the repository (the pages link its files), without what builds leave
    skip = shutil.ignore_patterns(".git", "site", "runs", "__pycache__", "*.egg-info")
    shutil.copytree(REPO, work, ignore=skip)
    with open(work / "docs" / "cli.md", "a", encoding="utf-8") as f:
        f.write("\nSee [the missing page](no_such_page.md).\n")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=work, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode != 0
    assert "no_such_page.md" in out.stdout + out.stderr
