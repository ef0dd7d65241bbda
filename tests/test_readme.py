"""The README's Python blocks run as written, and their results make sense."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """Each Python block runs alone, as copied into a fresh interpreter (its own namespace)."""
    monkeypatch.chdir(tmp_path)  # the calibration block writes under runs/
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3

    def run(block: str) -> dict:
        ns: dict = {"__name__": "__main__"}
        exec(compile(block, str(README), "exec"), ns)
        return ns

    ns = run(blocks[0])
    assert len(ns["out"].text) == 2
    ns = run(blocks[1])
    # the custom policy with budget 5 on a one-view LLaVA-1.5 model
    assert ns["out"].record.visual_tokens_llm == [5, 5]
    # its default budget (64) does not fit the tiny model's 36 patches: refused by its check()
    tc = ns["tc"]
    with pytest.raises(tc.BudgetError, match=r"budget=64 is outside the allowed range \[1, 36\]"):
        tc.generate(ns["model"], ns["images"], ns["prompts"], method=tc.method("keep-brightest"))
    ns = run(blocks[2])
    keep = ns["schedule"]["keep"]
    assert all(a >= b for a, b in zip(keep, keep[1:]))
    assert len(ns["out"].record.frozen_layers) == 2
    assert (tmp_path / "runs" / "calib" / "shortv.json").is_file()


def test_readme_lists_every_registered_method():
    import tokencomp as tc

    table = README.read_text().split("## Methods", 1)[1].split("\n## ", 1)[0]
    first_column = [row.split("|")[1] for row in table.splitlines() if row.startswith("| `")]
    listed = set(re.findall(r"`([\w+-]+)`", "".join(first_column)))
    public = {  # the project's methods (the README's own example registers one more)
        name
        for name in tc.available_methods()
        if not name.startswith("_") and tc.method_class(name).__module__.startswith("tokencomp.methods.")
    }
    assert public <= listed, f"methods missing from the README's table: {sorted(public - listed)}"


def test_ci_runs_exactly_the_readme_test_command():
    text = README.read_text()
    block = text.split("**Tests**", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == block
