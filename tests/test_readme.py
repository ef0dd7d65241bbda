"""The README's Python quick start runs as written, and its result makes sense."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)
    out = ns["out"]
    # the last block ran the custom policy with budget 5 on a one-view LLaVA-1.5 model
    assert out.record.visual_tokens_llm == [5, 5]
    assert len(out.text) == 2


def test_ci_runs_the_readme_test_command():
    readme = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme
