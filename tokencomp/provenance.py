"""Which code scored a run: recorded in every prediction and results row, so a run resumed on other
code (a changed FLOPs formula, a fixed method) says so instead of mixing the two silently."""

from __future__ import annotations

import subprocess
from pathlib import Path

UNRECORDED = "unrecorded"  # a row written before rows recorded their code

# the source trees whose edits change what a run measures (the rest of a checkout does not)
_CODE_DIRS = ("tokencomp", "methods")


def code_version(root: str | Path | None = None) -> str:
    """The code a run is made with: ``"tokencomp <version>"``, followed, when the packages are run
    from a git checkout, by ``+g<commit>`` (12 hex digits) and ``.dirty`` if tracked files under
    ``tokencomp/`` or ``methods/`` differ from that commit (the rest of the checkout, e.g. results
    committed under ``experiments/``, does not count).

    Args:
        root: the directory holding the ``tokencomp`` and ``methods`` packages (default: where
            this one is imported from). An installed copy that is not the top of a git checkout
            gives the version alone.
    """
    from . import __version__

    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    plain = f"tokencomp {__version__}"

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return plain  # e.g. a site-packages inside some other repository
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", *_CODE_DIRS)
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, or no commit yet
        return plain
    return f"{plain}+g{commit}{'.dirty' if dirty else ''}"


def codes_of(rows: list[dict]) -> list[str]:
    """The distinct codes that made ``rows`` (prediction rows' ``code`` strings or results rows'
    ``code`` lists), sorted; `UNRECORDED` stands for rows that do not say."""
    found: set[str] = set()
    for r in rows:
        c = r.get("code", UNRECORDED)
        found.update([c] if isinstance(c, str) else c)
    return sorted(found)
