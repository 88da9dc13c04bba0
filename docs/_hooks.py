"""mkdocs hooks: the README is the site's home page, and links from docs/ to repository files
(`../experiments/results/x.png`, `../benchmarks/dpo_step.py`) work both on a code host and in the
site. A link to a repository path that does not exist fails the (strict) build."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parent.parent
_LINK = re.compile(r"\]\((\.\./[^)#\s]+)(#[^)\s]*)?\)")
_README_LINK = re.compile(r"\]\((?!https?:|#)([^)\s]+)\)")


def _home_link(m: re.Match) -> str:
    target = m.group(1)
    if target.startswith("docs/") and target != "docs/":
        return f"]({target[5:]})"  # a docs page: a sibling of the home page in the site
    return f"](../{target})"  # any other repository file (checked and copied like the pages' links)


def _repo_links(markdown: str) -> list[str]:
    return [m.group(1)[3:] for m in _LINK.finditer(markdown)]


def on_files(files, config):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    # README links say docs/x.md (right on a code host); in the site, pages are siblings of the home page.
    home = _README_LINK.sub(_home_link, readme)
    files.append(File.generated(config, "index.md", content=home))
    wanted: set[str] = set()
    for f in list(files):
        if f.src_uri.endswith(".md"):
            text = f.content_string if f.generated_by else Path(f.abs_src_path).read_text(encoding="utf-8")
            for rel in _repo_links(text):
                if not (REPO / rel).is_file():
                    raise PluginError(f"{f.src_uri}: link to ../{rel}, which is not a file in the repository")
                wanted.add(rel)
    for rel in sorted(wanted):
        files.append(File.generated(config, f"_repo/{rel}", abs_src_path=str(REPO / rel)))
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")
    prefix = "../" * depth + "_repo/"
    return _LINK.sub(lambda m: f"]({prefix}{m.group(1)[3:]}{m.group(2) or ''})", markdown)
