"""`code_version`: the commit of the checkout the packages run from, dirty only for code edits."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import tokencomp as tc
from tokencomp.provenance import UNRECORDED, code_version, codes_of

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(root, *args):
    return subprocess.run(
        ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_code_version_names_the_commit_and_only_code_edits_make_it_dirty(tmp_path):
    plain = f"tokencomp {tc.__version__}"
    assert code_version(tmp_path) == plain  # not a checkout
    for rel in ("tokencomp/engine.py", "methods/fastv.py", "experiments/results.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("one\n")
    _git(tmp_path, "init", "-q")
    assert code_version(tmp_path) == plain  # a checkout with no commit yet
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "first")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert code_version(tmp_path) == f"{plain}+g{head[:12]}"
    (tmp_path / "experiments/results.md").write_text("two\n")  # results, not code
    (tmp_path / "tokencomp/new_file.py").write_text("x = 1\n")  # untracked
    assert code_version(tmp_path) == f"{plain}+g{head[:12]}"
    for rel in ("tokencomp/engine.py", "methods/fastv.py"):
        (tmp_path / rel).write_text("two\n")
        assert code_version(tmp_path) == f"{plain}+g{head[:12]}.dirty"
        _git(tmp_path, "checkout", "--", rel)
    # packages copied into a folder of some other repository are not that repository's code
    assert code_version(tmp_path / "tokencomp") == plain


def test_codes_of_reads_prediction_and_results_rows():
    rows = [{"code": "b"}, {"code": ["a", "b"]}, {}]
    assert codes_of(rows) == sorted(["a", "b", UNRECORDED])
    assert codes_of([]) == []
