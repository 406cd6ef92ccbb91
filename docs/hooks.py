"""MkDocs hooks: the benchmark pages live in benchmarks/ (written by `make bench`), outside
docs/; they join the site under benchmarks/ so links to them are resolved and checked. The
README, the repository's front page, is not part of the site: its relative links are checked
here, so `mkdocs build --strict` fails on them too."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files, InclusionLevel

OUTSIDE = ("benchmarks/README.md", "benchmarks/RESULTS.md")
LINK = re.compile(r"\]\(([^)\s#]+)[^)]*\)")
log = logging.getLogger("mkdocs.hooks")


def on_pre_build(config: Any, **_: Any) -> None:
    """Warn (an error under --strict) for each README link to a file that does not exist."""
    root = Path(config.config_file_path).parent
    for target in LINK.findall((root / "README.md").read_text()):
        if "://" not in target and not (root / target).exists():
            log.warning("README.md links to '%s', which does not exist", target)


def on_files(files: Files, config: Any, **_: Any) -> Files:
    """Add each file under its path relative to docs/ (`../benchmarks/...`), built into
    site/benchmarks/ (a path above the site would be written outside it); included explicitly,
    as a path starting with a dot is excluded by default."""
    root = Path(config.config_file_path).parent
    for path in OUTSIDE:
        file = File.generated(
            config, f"../{path}", abs_src_path=str(root / path), inclusion=InclusionLevel.INCLUDED
        )
        file.dest_uri = path.removesuffix(".md").removesuffix("/README") + "/index.html"
        files.append(file)
    return files
