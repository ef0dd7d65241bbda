"""tokencomp inside lmms-eval: its own CLI runs the offline tc-scenes task through `--model tokencomp`
(found by the entry point), and each method's accuracy and answers equal `tokencomp compare` on
the same questions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval")

from tokencomp.data import read_rows  # noqa: E402
from tokencomp.runner import load_experiment, run_experiment  # noqa: E402

# each compare cell's label and the same method as lmms-eval model arguments
MODEL_ARGS = {
    "identity": "method=identity",
    "visionzip": "method=visionzip,budget=16",
    "pool+fastv": "method=pool+fastv,pool.budget=16,fastv.k=2",
}
EXPERIMENT = """
[experiment]
name = "lmms"
batch_size = 4
max_new_tokens = 8
latency_repeats = 1

[[model]]
name = "tiny-llava"

[[dataset]]
name = "tc"
path = "{path}"

[[method]]
name = "identity"

[[method]]
name = "visionzip"
budget = 16

[[method]]
label = "pool+fastv"
compose = [{{name = "pool", budget = 16}}, {{name = "fastv", k = 2}}]
"""


def _lmms_eval(task, out, model_args: str, model: str = "tokencomp", batch_size: int = 4):
    """lmms-eval's CLI on the task: its accuracy, the answers by document, tokencomp's record rows."""
    record = out / "record.jsonl"
    cmd = [sys.executable, "-m", "lmms_eval", "eval", "--model", model, "--include_path", str(task)]
    cmd += ["--tasks", "tc_scenes", "--batch_size", str(batch_size), "--log_samples", "--output_path", str(out)]
    if model == "tokencomp":
        cmd += ["--model_args", f"pretrained=tiny-llava,{model_args},record={record}"]
    else:  # lmms-eval's own model: its simple (not chat) variant, on the CPU
        cmd += ["--force_simple", "--device", "cpu", "--model_args", model_args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    failed = done.returncode != 0 or "Error during evaluation" in done.stderr + done.stdout  # (it exits 0)
    assert not failed, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(next(out.rglob("*_results.json")).read_text())
    samples = [json.loads(x) for x in next(out.rglob("*_samples_tc_scenes.jsonl")).read_text().splitlines() if x]
    answers = {s["doc_id"]: s["filtered_resps"] for s in samples}
    return results["results"]["tc_scenes"]["tc_accuracy,none"], answers, read_rows(record)


def test_lmms_eval_equals_compare_on_the_same_questions(tmp_path):
    from tokencomp.lmms import write_task

    task = write_task(tmp_path / "task", n=12)
    data = task / "data" / "test.jsonl"
    exp_file = tmp_path / "exp.toml"
    exp_file.write_text(EXPERIMENT.format(path=data))
    exp = load_experiment(exp_file, tmp_path / "compare")
    run_experiment(exp, progress=False, side_by_side=False)
    rows = dict(zip(MODEL_ARGS, read_rows(exp.out / "results.jsonl")))  # in the file's cell order
    for label, model_args in MODEL_ARGS.items():
        accuracy, answers, record = _lmms_eval(task, tmp_path / label, model_args)
        preds = read_rows(exp.out / "predictions" / f"{rows[label]['cell']}.jsonl")
        assert [answers[i] for i in range(len(preds))] == [p["prediction"] for p in preds], label
        assert accuracy == pytest.approx(rows[label]["accuracy"]), label
        by_doc = {r["doc_id"]: r for r in record}
        assert [by_doc[i]["visual_tokens_llm"] for i in range(len(preds))] == [p["visual_tokens_llm"] for p in preds]
        assert [by_doc[i]["prefill_flops"] for i in range(len(preds))] == [p["prefill_flops"] for p in preds]


def test_identity_equals_lmms_evals_own_llava_hf(tmp_path):
    """The unmodified model through tokencomp answers as lmms-eval's own Hugging Face LLaVA model
    (its Vicuna prompt is tokencomp's ``vicuna_v1`` template; it decodes one request at a time)."""
    pytest.importorskip("decord")  # lmms-eval's llava_hf imports it
    from tokencomp.lmms import write_task
    from tokencomp.model import model_path

    task = write_task(tmp_path / "task", n=12)
    theirs = _lmms_eval(task, tmp_path / "hf", f"pretrained={model_path('tiny-llava')},device_map=cpu", "llava_hf", 1)
    ours = _lmms_eval(task, tmp_path / "tc", "method=identity,template=vicuna_v1", batch_size=1)
    assert ours[1] == theirs[1] and ours[0] == theirs[0]


def test_model_arguments_name_composed_methods():
    from tokencomp.errors import TokencompError
    from tokencomp.lmms import strategies_from_args

    one = strategies_from_args("visionzip", {"budget": 32})
    assert [str(s) for s in one] == [str(s) for s in strategies_from_args("visionzip", {"visionzip.budget": 32})]
    two = strategies_from_args("pool+fastv", {"pool.budget": 16, "fastv.k": 2})
    assert [s.label for s in two] == ["pool", "fastv"] and two[0].budget == 16 and two[1].k == 2
    with pytest.raises(TokencompError, match=r"'budget'.*<method>.<parameter>"):
        strategies_from_args("pool+fastv", {"budget": 16})


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """Under torchrun (2 CPU processes, gloo) lmms-eval shards the documents; the answers, the
    accuracy and the records (one file per process) equal a single process's."""
    import os

    from tokencomp.lmms import write_task

    task = write_task(tmp_path / "task", n=12)
    accuracy, answers, record = _lmms_eval(task, tmp_path / "one", "method=visionzip,budget=16")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lmms_eval"]
    cmd += ["eval", "--model", "tokencomp", "--include_path", str(task), "--tasks", "tc_scenes", "--batch_size", "4"]
    cmd += ["--log_samples", "--output_path", str(tmp_path / "two")]
    cmd += ["--model_args", f"pretrained=tiny-llava,method=visionzip,budget=16,record={tmp_path / 'two' / 'r.jsonl'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0 and "Error during evaluation" not in done.stderr + done.stdout, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "two").rglob("*_results.json")).read_text())
    assert results["results"]["tc_scenes"]["tc_accuracy,none"] == pytest.approx(accuracy)
    samples = next((tmp_path / "two").rglob("*_samples_tc_scenes.jsonl")).read_text().splitlines()
    assert {s["doc_id"]: s["filtered_resps"] for s in map(json.loads, samples)} == answers
    parts = [read_rows(tmp_path / "two" / f"r.rank{r}.jsonl") for r in (0, 1)]
    assert all(parts) and sorted(r["doc_id"] for p in parts for r in p) == sorted(r["doc_id"] for r in record)


def test_loglikelihood_equals_hugging_face(tmp_path):
    """A continuation's log-probability under the unmodified model equals Hugging Face's own
    forward on the same prompt; under FastV it changes (the compressed model scores it)."""
    import torch
    from conftest import make_images
    from lmms_eval.api.instance import Instance

    import tokencomp as tc
    from tokencomp.lmms import TokencompModel

    lm = TokencompModel(pretrained="tiny-llava")
    image = make_images([(80, 80)])[0]
    docs = [{"q": "what color is the circle ?", "a": " red"}, {"q": "how many squares ?", "a": " two"}]
    lm.task_dict = {"t": {"test": docs}}
    requests = [
        Instance(
            "loglikelihood",
            (d["q"], lambda doc: doc["a"], lambda doc: [image], i, "t", "test"),
            i,
            {"task": "t", "doc_id": i, "repeats": 1},
        )
        for i, d in enumerate(docs)
    ]
    got = lm.loglikelihood(requests)
    model, tok = lm.model, lm.model.tokenizer
    for (logprob, _), d in zip(got, docs):
        prompt = tc.data.fill_template("llava", d["q"])
        batch = tc.prepare(model, [image], [prompt + d["a"]])
        n = len(tok(prompt + d["a"])["input_ids"]) - len(tok(prompt)["input_ids"])
        with torch.no_grad():
            logits = model.hf(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
            ).logits
        ref = logits[0, -n - 1 : -1].float().log_softmax(-1).gather(1, batch.input_ids[0, -n:, None]).sum()
        assert logprob == pytest.approx(float(ref), abs=1e-4)
    lm.engine = tc.Engine(model, tc.method("fastv", k=1, ratio=0.9))
    assert [x for x, _ in lm.loglikelihood(requests)] != [x for x, _ in got]
