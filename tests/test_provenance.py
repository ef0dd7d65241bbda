"""`code_version`: the commit of the checkout the packages run from, dirty only for code edits."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import tokencomp as tc
from tokencomp.provenance import UNRECORDED, code_version, codes_of, file_digests, strategy_files

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(root, *args):
    return subprocess.run(
        ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
    ).stdout.strip()


def test_code_version_names_the_commit_and_digests_code_edits(tmp_path, monkeypatch):
    plain = f"tokencomp {tc.__version__}"
    repo = tmp_path / "repo"
    assert code_version(tmp_path) == plain  # not a checkout
    for rel in ("tokencomp/engine.py", "tokencomp/methods/fastv.py", "experiments/results.md"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("one\n")
    _git(repo, "init", "-q")
    assert code_version(repo) == f"{plain}+gunknown"  # a checkout with no commit to name
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "first")
    clean = f"{plain}+g{_git(repo, 'rev-parse', 'HEAD')[:12]}"
    assert code_version(repo) == clean
    monkeypatch.setenv("GIT_DIR", str(Path(tc.__file__).parents[1] / "no-such-repo"))  # ignored
    (repo / "experiments/results.md").write_text("two\n")  # results, not code
    assert code_version(repo) == clean
    seen = set()
    for rel, text in (
        ("tokencomp/engine.py", "two\n"),
        ("tokencomp/engine.py", "three\n"),
        ("tokencomp/methods/new.py", "x\n"),
    ):
        (repo / rel).write_text(text)  # an edit, another edit, a new (untracked) method file
        code = code_version(repo)
        assert code.startswith(f"{clean}.dirty-") and code not in seen
        seen.add(code)
        assert code_version(repo) == code  # the same edits, the same code
        _git(repo, "checkout", "--", "tokencomp/engine.py")
        (repo / "tokencomp/methods/new.py").unlink(missing_ok=True)
    assert code_version(repo) == clean
    # packages copied into a folder of some other repository are not that repository's code
    assert code_version(repo / "tokencomp") == plain


def test_codes_of_reads_prediction_and_results_rows():
    rows = [{"code": "b"}, {"code": ["a", "b"]}, {}]
    assert codes_of(rows) == sorted(["a", "b", UNRECORDED])
    assert codes_of([]) == []


@tc.register("_test-reads-file")
class _ReadsFile(tc.FreezeStrategy):
    """Stands in for ShortV / G-Search: a parameter names a file the method reads."""

    calibration: str = "preset-name"

    def frozen_layers(self, num_layers):
        return []


def test_strategy_files_are_its_defining_file_and_the_files_its_parameters_name(tmp_path):
    calib = tmp_path / "calib.json"
    calib.write_text("{}")
    assert strategy_files([tc.method("fastv"), tc.method("_test-reads-file")]) == [Path(__file__).resolve()]
    got = strategy_files([tc.method("_test-reads-file", calibration=str(calib))])
    assert got == sorted([Path(__file__).resolve(), calib.resolve()])
    before = file_digests([calib])
    calib.write_text('{"visual": [1]}')
    assert file_digests([calib]) != before and file_digests([calib]).startswith("; calib.json@")
