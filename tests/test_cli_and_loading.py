"""Loading a checkpoint from a local path, and the command line."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import PROMPTS, make_images

import tokencomp as tc
from tokencomp.cli import main
from tokencomp.tiny import tiny_llava


@pytest.fixture(scope="module", params=["llava", "llava-next"])
def saved(request, tmp_path_factory):
    hf, proc = tiny_llava(request.param, seed=7)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    proc.save_pretrained(path)
    image = path / "image.png"
    make_images([(80, 120)])[0].save(image)
    return path, hf, proc, image


def test_load_model_from_local_path_equals_in_memory(saved):
    path, hf, proc, image = saved
    loaded = tc.load_model(path)
    assert loaded.family == tc.Model(hf, proc).family
    from PIL import Image

    im = Image.open(image).convert("RGB")
    a = tc.generate(loaded, [im], PROMPTS[:1], max_new_tokens=4)
    b = tc.generate(tc.Model(hf, proc), [im], PROMPTS[:1], max_new_tokens=4)
    assert a.tokens == b.tokens
    torch.testing.assert_close(a.prefill.logits, b.prefill.logits)


def test_load_model_errors(tmp_path):
    with pytest.raises(tc.TokencompError, match="neither an embedded model"):
        tc.load_model(tmp_path / "missing")
    with pytest.raises(tc.TokencompError, match="not a model directory"):
        tc.load_model(tmp_path)


EVIL = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('checkpoint code ran')\n"


def test_loading_never_runs_checkpoint_code(tmp_path, saved):
    """A folder whose config asks transformers to run its own code (``auto_map``): the model type
    is refused from config.json before transformers reads it; in a LLaVA folder the processor's and
    config's ``auto_map`` entries are never imported either."""
    import shutil

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "evil.py").write_text(EVIL)
    (evil / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.Config"}}))
    with pytest.raises(tc.UnsupportedModelError, match="model_type 'evil' is not one of"):
        tc.load_model(evil)
    assert not (evil / "RAN").exists()
    # a real LLaVA checkpoint, every config file pointing at the folder's code
    path = tmp_path / "llava"
    shutil.copytree(saved[0], path)
    (path / "evil.py").write_text(EVIL)
    for name in ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            cfg = json.loads(file.read_text())
            cfg["auto_map"] = {k: "evil.Thing" for k in ("AutoConfig", "AutoModel", "AutoProcessor", "AutoTokenizer")}
            cfg["auto_map"]["AutoImageProcessor"] = "evil.Thing"
            file.write_text(json.dumps(cfg))
    with contextlib.suppress(tc.TokencompError):  # refusing is fine; running the code is not
        tc.load_model(path)
    assert not (path / "RAN").exists()


def test_checkpoint_without_weights_or_processor(tmp_path, saved):
    import shutil

    for drop, message in (("*.safetensors", "no weights"), ("*token*", "no usable processor")):
        path = tmp_path / drop.strip("*.")
        shutil.copytree(saved[0], path)
        for f in path.glob(drop):
            f.unlink()
        with pytest.raises(tc.TokencompError, match=message):
            tc.load_model(path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(tc.TokencompError, match="not a JSON config"):
        tc.load_model(bad)


def test_cli_generate_json(saved, capsys):
    path, hf, proc, image = saved
    code = main(
        [
            "generate",
            "--model",
            str(path),
            "--image",
            str(image),
            "--prompt",
            "what color ?",
            "--method",
            "random",
            "--budget",
            "5",
            "--max-new-tokens",
            "3",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert 1 <= len(out["tokens"]) <= 3
    # the same run through the Python API gives the same tokens
    from PIL import Image

    im = Image.open(image).convert("RGB")
    # a prompt without <image> goes into the model family's conversation template, as compare does
    model = tc.load_model(path)
    wrapped = "USER: <image>\nwhat color ? ASSISTANT:"
    api = tc.generate(model, [im], [wrapped], method=tc.method("random", budget=5), max_new_tokens=3)
    assert api.tokens[0] == out["tokens"]
    assert out["record"]["visual_tokens_llm"] == api.record.visual_tokens_llm
    assert out["record"]["tokens_per_layer"] == api.record.tokens_per_layer
    if api.prefill.state.hidden.shape and "next" not in str(path):
        assert out["record"]["visual_tokens_llm"] == [5]
    # --template plain: the question after the image alone; a prompt holding <image> is used as is
    for extra, prompt in ((["--template", "plain"], "what color ?"), ([], "<image>\nwhat color ?")):
        args = ["generate", "--model", str(path), "--image", str(image), "--prompt", prompt, "--json", *extra]
        assert main([*args, "--max-new-tokens", "2"]) == 0
        got = json.loads(capsys.readouterr().out)["record"]
        plain = tc.generate(model, [im], ["<image>\nwhat color ?"], max_new_tokens=2).record
        templated = tc.generate(model, [im], [wrapped], max_new_tokens=2).record
        assert got["tokens_per_layer"] == plain.tokens_per_layer != templated.tokens_per_layer


def test_cli_errors(saved, capsys):
    path, _, _, image = saved
    assert main(["generate", "--model", str(path), "--image", str(image), "--prompt", "x", "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                "--model",
                str(path),
                "--image",
                str(image),
                "--prompt",
                "x",
                "--method",
                "random",
                "--budget",
                "0",
            ]
        )
        == 2
    )
    assert "budget" in capsys.readouterr().err
    assert main(["generate", "--model", str(path), "--image", "missing.png", "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_methods_lists_builtins(capsys):
    """`tokencomp methods` lists every public method with its parameters, and each built-in one
    with a summary written for it (not the signature a dataclass makes up); `tokencomp methods
    NAME` adds the algorithm."""
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    public = [n for n in tc.available_methods() if not n.startswith("_")]
    assert {"identity", "random", "pool", "bilinear", "fastv", "freeze", "visionzip", "shortv"} <= set(public)
    starts = [line.split()[0] for line in out.splitlines() if not line.startswith(" ")]
    assert starts == public  # internal probes ("_name") are not listed
    for name in public:
        cls = tc.method_class(name)
        if not cls.__module__.startswith("tokencomp.methods."):  # registered by another test (the README's example)
            continue
        doc = cls.__dict__.get("__doc__") or ""
        assert doc and not doc.startswith(f"{cls.__name__}("), f"{name} has no docstring of its own"
        first = " ".join(doc.split())[:40]
        assert first in " ".join(out.split()), name
    assert main(["methods", "fastv"]) == 0
    one = capsys.readouterr().out
    assert one.startswith("fastv ") and "query='last'" in one
    assert "arXiv 2403.06764" in one and 'query="all"' in one  # the module's options, not only the summary
    assert main(["methods", "fastvv"]) == 2
    assert "unknown method 'fastvv'" in capsys.readouterr().err


def test_cli_broken_pipe(monkeypatch, tmp_path):
    """A reader that stops early (`tokencomp methods | head`) ends the listing quietly with exit
    code 1; a broken pipe inside a long command (here the report) is not swallowed."""
    import os
    import sys

    from tokencomp import cli, report

    def broken(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    saved = os.dup(sys.stdout.fileno())  # the handler points stdout at /dev/null: put it back after
    try:
        monkeypatch.setattr(cli, "_methods", broken)
        assert main(["methods"]) == 1
    finally:
        os.dup2(saved, sys.stdout.fileno())
        os.close(saved)
    monkeypatch.setattr(report, "make_report", broken)
    with pytest.raises(BrokenPipeError):
        main(["report", str(tmp_path)])


def test_fill_template():
    """A question in a conversation template: the template's own <image> becomes one token per
    image (not an <image> inside the question); malformed templates are refused clearly."""
    from tokencomp.data import fill_template

    assert fill_template("llava", "what?") == "USER: <image>\nwhat? ASSISTANT:"
    assert fill_template("{question} <image>", "is <image> here?", 2, "<img>") == "is <image> here? <img> <img>"
    for bad in ("nope", "Q: {question} A:", "Answer {JSON}: <image> {question}", "<image> {question}}"):
        with pytest.raises(tc.TokencompError, match="template"):
            fill_template(bad, "x")


def test_cli_plugin_registers_a_method_of_ones_own(tmp_path, capsys):
    plugin = tmp_path / "mine.py"
    plugin.write_text(
        "import tokencomp as tc\n\n\n@tc.register('_test-cli-plugin')\n"
        "class Mine(tc.VisionStrategy):\n    '''Keeps the first patches (a plugin test).'''\n\n    budget: int = 4\n\n"
        "    def select(self, view):\n        return view.features.new_zeros(0)\n"
    )
    assert main(["methods", "_test-cli-plugin", "--plugin", str(plugin)]) == 0
    assert "Keeps the first patches" in capsys.readouterr().out
    assert main(["methods", "x", "--plugin", str(tmp_path / "none.py")]) == 2
    assert "none.py' does not exist" in capsys.readouterr().err


def test_every_subpackage_is_packaged():
    """pyproject lists every package under tokencomp/ (a wheel would lack an unlisted one; an
    editable install hides that)."""
    from pathlib import Path

    from tokencomp._compat import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "tokencomp").rglob("__init__.py")}
    assert listed == found


def test_the_parser_imports_neither_torch_nor_transformers():
    """`tokencomp --help` stays fast: building the parser loads no heavy library, and its dtype
    names are the runner's."""
    import subprocess
    import sys

    code = "import sys; from tokencomp.cli import build_parser; build_parser(); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    from tokencomp.cli import DTYPE_NAMES
    from tokencomp.experiment import DTYPES

    assert set(DTYPE_NAMES) == set(DTYPES)


def test_citation_file_is_valid_yaml_with_the_version():
    from pathlib import Path

    import yaml

    import tokencomp

    cff = yaml.safe_load((Path(__file__).resolve().parents[1] / "CITATION.cff").read_text())
    assert cff["cff-version"].startswith("1.2") and cff["version"] == tokencomp.__version__ and cff["title"]
