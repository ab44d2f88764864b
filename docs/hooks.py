"""mkdocs hook: the repository-root documents as site pages, their links rewritten for the site."""
from __future__ import annotations

import os
import re

from mkdocs.structure.files import File

# root file -> page in the site
ROOT_PAGES = {"README.md": "index.md", "BENCHMARKS.md": "performance.md", "EXPERIMENTS.md": "experiments.md"}
_LINK = re.compile(r"\]\((?P<target>[^)#\s]*)(?P<anchor>#[^)\s]*)?\)")


def _site_target(target: str, from_docs: bool) -> str:
    """Where a link written for GitHub points in the site."""
    path = os.path.normpath(os.path.join("docs", target)) if from_docs else os.path.normpath(target)
    if path in ROOT_PAGES:
        return ROOT_PAGES[path]
    if path.startswith("docs" + os.sep):
        return path[len("docs" + os.sep):]
    return target


def _rewrite(markdown: str, from_docs: bool) -> str:
    def replace(match: re.Match) -> str:
        target = match.group("target")
        if not target or "://" in target:
            return match.group(0)
        return f"]({_site_target(target, from_docs)}{match.group('anchor') or ''})"

    return _LINK.sub(replace, markdown)


def on_files(files, config):
    root = os.path.dirname(config["config_file_path"])
    for source, page in ROOT_PAGES.items():
        with open(os.path.join(root, source), encoding="utf-8") as f:
            files.append(File.generated(config, page, content=_rewrite(f.read(), from_docs=False)))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri in ROOT_PAGES.values():
        return markdown
    return _rewrite(markdown, from_docs=True)
