"""Which code scored a run: recorded in every prediction and results row, so a run resumed on other
code (a changed FLOPs formula, a fixed method) says so instead of mixing the two silently."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

UNRECORDED = "unrecorded"  # a row written before rows recorded their code

# the source trees whose edits change what a run measures (the rest of a checkout does not)
_CODE_DIRS = ("tokencomp",)


def code_version(root: str | Path | None = None) -> str:
    """The code of the package a run is made with: ``"tokencomp <version>"``, followed, when the
    package is run from the top of a git checkout, by ``+g<commit>`` (12 hex digits) and, where
    ``tokencomp/`` differs from that commit (edited or new files, untracked ones included),
    ``.dirty-<8 hex>``, a digest of those differences: two different sets of uncommitted edits give
    two different codes. The rest of the checkout (e.g. results committed under ``experiments/``)
    does not count. ``+gunknown`` when the folder is a checkout that git will not read (not
    installed, or a repository owned by another user). A cell's code appends `file_digests` of its
    `strategy_files`.

    Args:
        root: the directory holding the ``tokencomp`` package (default: where this one is imported
            from). An installed copy that is not the top of a git checkout gives the version alone.
    """
    from . import __version__

    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    plain = f"tokencomp {__version__}"
    if not (root / ".git").exists():  # a directory, or a file in a worktree or submodule
        return plain
    # the checkout at root, whatever repository the environment points git to
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=True, env=env
        ).stdout

    try:
        commit = git("rev-parse", "--short=12", "HEAD").strip()
        changed = git("status", "--porcelain", "--untracked-files=all", "--", *_CODE_DIRS)
        if not changed.strip():
            return f"{plain}+g{commit}"
        digest = hashlib.sha256(git("diff", "HEAD", "--binary", "--", *_CODE_DIRS).encode())
        for name in sorted(git("ls-files", "--others", "--exclude-standard", "--", *_CODE_DIRS).splitlines()):
            digest.update(name.encode() + b"\0" + (root / name).read_bytes())
    except (OSError, subprocess.SubprocessError):  # no git, no commit yet, or not a repository git trusts
        return f"{plain}+gunknown"
    return f"{plain}+g{commit}.dirty-{digest.hexdigest()[:8]}"


def strategy_files(strategies) -> list[Path]:
    """The files a cell's results depend on besides the package: those that define ``strategies``'
    classes outside it (a plugin, a script's own method) and those its parameters name (a ShortV
    calibration, a saved G-Search schedule). Their digests join a cell's code, so an edited file
    is another code; the package's own files are in its commit."""
    files = set()
    for s in strategies or []:
        module = type(s).__module__
        path = getattr(sys.modules.get(module), "__file__", None)
        if path and module != "tokencomp" and not module.startswith("tokencomp."):
            files.add(Path(path).resolve())
        for value in s.params().values():
            if isinstance(value, str) and value.endswith((".json", ".toml", ".pt", ".npy")) and Path(value).is_file():
                files.add(Path(value).resolve())
    return sorted(files)


def file_digests(files: Sequence[str | Path]) -> str:
    """``"; <file name>@<8 hex>"`` per file, a digest of its contents (what a cell's code appends
    to `code_version`)."""
    return "".join(f"; {Path(p).name}@{hashlib.sha256(Path(p).read_bytes()).hexdigest()[:8]}" for p in files)


def split_code(code: str) -> tuple[str, dict[str, str]]:
    """A code's two parts: the package's (`code_version`) and ``{file name: digest}`` of the files
    appended to it (`file_digests`)."""
    package, *files = code.split("; ")
    return package, dict(entry.rpartition("@")[::2] for entry in files)


def codes_of(rows: list[dict]) -> list[str]:
    """The distinct codes that made ``rows`` (prediction rows' ``code`` strings or results rows'
    ``code`` lists), sorted; `UNRECORDED` stands for rows that do not say."""
    found: set[str] = set()
    for r in rows:
        c = r.get("code", UNRECORDED)
        found.update([c] if isinstance(c, str) else c)
    return sorted(found)
