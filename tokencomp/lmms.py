"""tokencomp as an lmms-eval model: any lmms-eval image task through the engine and a compression method.

With the extra installed (``pip install -e ".[lmms]"``), lmms-eval finds the model through the
``lmms_eval.models`` entry point this package declares (no patching of lmms-eval)::

    python -m lmms_eval eval --model tokencomp --tasks mme,gqa --batch_size 8 \\
        --model_args pretrained=/ckpt/llava-v1.6-vicuna-7b-hf,method=visionzip,budget=64,device=cuda

Model arguments (lmms-eval's ``key=value,...``; a value cannot hold a comma):

- ``pretrained``: a local checkpoint folder or an embedded model name (``tiny-llava``).
- ``method``: a registered method (``tokencomp methods``), or several joined by ``+`` to compose
  them (``visionzip+fastv``); the other keys are the method's parameters, prefixed with its name
  and a dot when several are composed (``visionzip.budget=64,fastv.k=2``).
- ``plugins``: files or modules registering your own methods, separated by ``;``.
- ``template``: the conversation template (`tokencomp.data.TEMPLATES` name or a format string
  with ``{question}``; default the model family's), filled with lmms-eval's context as the
  question, one ``<image>`` per image.
- ``device``, ``dtype`` (``float32`` / ``float16`` / ``bfloat16``), ``attn_implementation``,
  ``max_new_tokens`` (when the task does not say; 64).
- ``record``: a JSONL file that receives one row per request: the task, document, visual tokens
  in and into the LLM, prefill and total FLOPs, and the batch's prefill seconds (the run record
  beside lmms-eval's own metrics; under a data-parallel launch each process writes its own,
  ``<record>.rank<r>.jsonl``); each `generate_until` call also logs their means.

Decoding is greedy (the engine's): a task asking for sampling is served greedily, with a warning.
Under ``accelerate launch`` / ``torchrun`` lmms-eval shards the documents over the processes; each
loads the model on its own GPU (``cuda`` becomes ``cuda:<LOCAL_RANK>``).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

import tokencomp as tc

from .data import TEMPLATES, fill_template
from .distributed import launcher_device
from .errors import TokencompError
from .experiment import DTYPES, import_plugins, model_load_options


def manifest():
    """The ``lmms_eval.models`` entry point: the model named ``tokencomp``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="tokencomp", simple_class_path="tokencomp.lmms.TokencompModel")


def strategies_from_args(method: str, params: dict) -> list:
    """The strategies ``method`` (names joined by ``+``) and its ``params`` name; a parameter of one
    of several composed methods is prefixed with the method's name and a dot."""
    names = [n.strip() for n in str(method).split("+") if n.strip()]
    if not names:
        raise TokencompError("method must name a registered method (tokencomp methods lists them)")
    own: dict[str, dict] = {n: {} for n in names}
    for key, value in params.items():
        name, dot, param = key.partition(".")
        if dot and name in own:
            own[name][param] = value
        elif len(names) == 1 and not dot:
            own[names[0]][key] = value
        else:
            raise TokencompError(
                f"model argument {key!r}: with methods {names} give each parameter as <method>.<parameter>"
            )
    return [tc.method(n, **own[n]) for n in names]


class TokencompModel(lmms):
    """An lmms-eval model running a tokencomp `Engine` (see the module docstring for its arguments)."""

    def __init__(
        self,
        pretrained: str,
        method: str = "identity",
        batch_size: int | str = 1,
        device: str = "cpu",
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        template: str | None = None,
        max_new_tokens: int = 64,
        plugins: str = "",
        record: str | None = None,
        **params,
    ) -> None:
        super().__init__()
        if plugins:
            import_plugins([p for p in str(plugins).split(";") if p], Path.cwd())
        params.pop("max_batch_size", None)  # lmms-eval's, for its "auto" batch size
        if str(batch_size).startswith("auto"):
            logger.warning("tokencomp's lmms-eval model takes a fixed batch size; 'auto' runs one request at a time")
            batch_size = 1
        table = {"name": pretrained, "device": launcher_device(str(device)), "dtype": dtype}
        opts = model_load_options({**table, "attn_implementation": attn_implementation})  # checked before loading
        self.model = tc.load_model(
            pretrained, dtype=DTYPES[opts["dtype"]], device=opts["device"], attn_implementation=attn_implementation
        )
        self.engine = tc.Engine(self.model, strategies_from_args(method, params))
        self.batch_size_per_gpu = int(batch_size)
        self.template = template or self.model.family
        fill_template(self.template, "?")  # a bad template fails here, before any request
        self.max_new_tokens = int(max_new_tokens)
        self.record = Path(record) if record else None
        self._sampling_warned = False

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # -- requests -------------------------------------------------------------------------------
    def _inputs(self, context: str, doc_to_visual, doc_id, task: str, split: str) -> tuple[list, str]:
        """A request's images and its prompt (lmms-eval's context in the template)."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        images = [v for v in (visuals or []) if v is not None]
        if any(isinstance(v, str) for v in images):
            raise TokencompError(f"task {task!r} gives videos or paths; tokencomp's lmms-eval model reads images")
        if "<image>" in context:  # the task placed its images itself
            fmt = TEMPLATES.get(self.template, self.template).replace("<image>\n", "").replace("<image>", "")
            return images, fmt.format(question=context)
        return images, fill_template(self.template, context, images=len(images))

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, cut at the task's ``until`` strings, batched ``batch_size`` at a time
        among requests with the same generation settings."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        tok = self.model.tokenizer
        bar = tqdm(total=len(requests), desc="tokencomp responding", disable=self.rank != 0)
        stats = []
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if (kwargs.get("do_sample") or (kwargs.get("temperature") or 0) > 0) and not self._sampling_warned:
                logger.warning("tokencomp decodes greedily; the task's sampling settings are not used")
                self._sampling_warned = True
            steps = int(kwargs.get("max_new_tokens") or self.max_new_tokens)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                inputs = [self._inputs(requests[i].args[0], *requests[i].args[2:6]) for i in chunk]
                batch = tc.prepare(self.model, [im or None for im, _ in inputs], [p for _, p in inputs])
                tokens, pre = self.engine.generate(batch, steps, tok.eos_token_id, tok.pad_token_id or 0)
                for b, i in enumerate(chunk):
                    text = tok.decode(tokens[b], skip_special_tokens=True)
                    for stop in until:
                        text = text.split(stop, 1)[0] if stop else text
                    out[i] = text.strip()
                    stats.append(self._row(requests[i], pre, b, len(chunk)))
                bar.update(len(chunk))
        bar.close()
        self._log(stats)
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(log p(continuation | context, images), whether greedy decoding gives it)`` per request,
        from the compressed model's logits (one request at a time)."""
        tok = self.model.tokenizer
        res = []
        for r in tqdm(requests, desc="tokencomp loglikelihood", disable=self.rank != 0):
            context, doc_to_target, doc_to_visual, doc_id, task, split = r.args[:6]
            doc = self.task_dict[task][split][doc_id]
            target = doc_to_target(doc) if callable(doc_to_target) else doc_to_target
            images, prompt = self._inputs(context, doc_to_visual, doc_id, task, split)
            n = len(tok(prompt + target)["input_ids"]) - len(tok(prompt)["input_ids"])
            if n <= 0:  # an empty continuation: log 1, and greedy decoding "gives" it
                res.append((0.0, True))
                continue
            batch = tc.prepare(self.model, [images or None], [prompt + target])
            pre = self.engine.prefill(batch, all_logits=True)
            logits = pre.logits[0][pre.state.valid[0]][-n - 1 : -1].float().log_softmax(-1)
            wanted = batch.input_ids[0, -n:].to(logits.device)
            res.append((float(logits.gather(1, wanted[:, None]).sum()), bool((logits.argmax(-1) == wanted).all())))
        return res

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("tokencomp's lmms-eval model serves single-round tasks")

    # -- the run record -------------------------------------------------------------------------
    def _row(self, request: Instance, pre, b: int, batch_size: int) -> dict:
        flops = pre.flops[b]
        return {
            "task": request.args[4],
            "doc_id": request.args[3],
            "method": pre.record.method,
            "visual_tokens_in": pre.record.visual_tokens_in[b],
            "visual_tokens_llm": pre.record.visual_tokens_llm[b],
            "prefill_flops": flops.prefill,
            "total_prefill_flops": flops.total_prefill,
            "prefill_s_batch": pre.record.prefill_s,
            "batch_size": batch_size,
        }

    def _log(self, rows: list[dict]) -> None:
        if not rows:
            return
        if self.record is not None:  # one file per process of a data-parallel launch
            path = self.record if self.world_size == 1 else self.record.with_suffix(f".rank{self.rank}.jsonl")
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        logger.info(
            f"tokencomp {rows[0]['method']}: {len(rows)} requests, visual tokens "
            f"{statistics.mean(r['visual_tokens_in'] for r in rows):.1f} -> "
            f"{statistics.mean(r['visual_tokens_llm'] for r in rows):.1f} into the LLM, LLM prefill "
            f"{statistics.mean(r['prefill_flops'] for r in rows) / 1e12:.4f} TFLOPs per request"
        )


TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
generation_kwargs:
  max_new_tokens: {max_new_tokens}
process_results: !function utils.process_results
metric_list:
  - metric: tc_accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

TASK_UTILS = '''"""tc-scenes as an lmms-eval task (written by `python -m tokencomp.lmms task`): the question as
the context, the image from the split's folder, scored as `tokencomp compare` scores it."""

from pathlib import Path

from PIL import Image

from tokencomp.metrics import answer_score

DATA = Path(__file__).resolve().parent / "data"


def doc_to_visual(doc):
    return [Image.open(DATA / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_target(doc):
    return doc["answers"][0]


def process_results(doc, results):
    return {"tc_accuracy": answer_score(results[0].strip(), doc["answers"])}
'''


def write_task(out: str | Path, n: int = 60, preset: str = "tc-scenes", max_new_tokens: int = 8) -> Path:
    """Write an lmms-eval task folder (for ``--include_path``): ``n`` questions of the tc-scenes
    test split (generated here, offline, as `tokencomp compare` generates it), a task named
    ``tc_scenes`` (``tc_scenes_next`` for the ``tc-scenes-next`` preset) scored by
    `tokencomp.metrics.answer_score` as ``tc_accuracy``. Returns the folder."""
    from .benchmark import PRESETS, generate_split

    if preset not in PRESETS:
        raise TokencompError(f"preset {preset!r} is not one of {sorted(PRESETS)}")
    out = Path(out)
    data = generate_split(out / "data", "test", n, **PRESETS[preset])
    name = preset.replace("-", "_")
    (out / f"{name}.yaml").write_text(
        TASK_YAML.format(name=name, data=json.dumps(str(data.resolve())), max_new_tokens=max_new_tokens), "utf-8"
    )
    (out / "utils.py").write_text(TASK_UTILS, "utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m tokencomp.lmms task OUT [--n N] [--preset tc-scenes|tc-scenes-next]``: write the
    offline tc-scenes task for lmms-eval and print the command that evaluates a method on it."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tokencomp.lmms", description=main.__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("task", help="write the offline tc-scenes lmms-eval task folder")
    t.add_argument("out")
    t.add_argument("--n", type=int, default=60, help="questions (default 60)")
    t.add_argument("--preset", default="tc-scenes", help="tc-scenes (tiny-llava) or tc-scenes-next (tiny-llava-next)")
    args = ap.parse_args(argv)
    folder = write_task(args.out, args.n, args.preset)
    name = args.preset.replace("-", "_")
    model = "tiny-llava" if args.preset == "tc-scenes" else "tiny-llava-next"
    print(
        f"python -m lmms_eval eval --model tokencomp --include_path {folder} --tasks {name} --batch_size 4 "
        f"--model_args pretrained={model},method=visionzip,budget=16 --output_path runs/lmms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
