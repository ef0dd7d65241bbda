"""Command line: ``tokencomp generate | methods | compare | report``."""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path


def _param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokencomp",
        description="Visual-token compression for LLaVA-style models (pruning, merging, layer freezing).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer a prompt about image(s) with a compression method")
    g.add_argument("--model", required=True, help="local checkpoint directory or embedded model name")
    g.add_argument("--image", action="append", required=True, help="image file (repeat for several images)")
    g.add_argument(
        "--prompt",
        required=True,
        help="the question; without an <image> it goes into --template, one <image> per image; with one, as is",
    )
    g.add_argument(
        "--template",
        default=None,
        help="conversation template for a prompt without <image>: a name (llava, llava-next, vicuna_v1, mistral, "
        "plain) or a format string with {question} (default: the model family's, as `compare` uses)",
    )
    g.add_argument("--method", default="identity", help="registered method name (see `tokencomp methods`)")
    g.add_argument("--budget", type=int, default=None, help="the method's token budget, if it has one")
    g.add_argument(
        "--param", action="append", type=_param, default=[], metavar="KEY=VALUE", help="other method parameters"
    )
    g.add_argument("--max-new-tokens", type=int, default=16, help="tokens to decode (default 16: a short answer)")
    g.add_argument("--json", action="store_true", help="print the answer and the run record as JSON")
    _plugin_argument(g)
    _load_arguments(g)

    m = sub.add_parser("methods", help="list the registered methods and their parameters, or describe one")
    m.add_argument("name", nargs="?", default=None, help="a method to describe: its parameters and algorithm")
    _plugin_argument(m)

    c = sub.add_parser("compare", help="run an experiment file (models x datasets x methods), resumable")
    c.add_argument("experiment", help="experiment TOML file (every key: the README's Formats section)")
    c.add_argument("--out", default=None, help="run directory (default: runs/<experiment name>)")
    c.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    c.add_argument(
        "--per-cell-latency",
        action="store_true",
        help="keep each cell's own timing (taken when it finished) instead of timing all cells side by side at the end",
    )
    _load_arguments(c, " (overrides every [[model]]'s own; a run resumes only on what it began with)")

    r = sub.add_parser("report", help="write report.md / report.html / plots from a run directory")
    r.add_argument("run_dir")
    r.add_argument(
        "--wait",
        action="store_true",
        help="if a compare or remeasure is still working in the run directory, wait for it to finish "
        "(without: write a report marked partial)",
    )

    m = sub.add_parser(
        "remeasure", help="time a run's finished cells again, side by side (interleaved), and rewrite their latency"
    )
    m.add_argument("run_dir")
    m.add_argument("--repeats", type=int, default=None, help="timed rounds (default: the experiment's latency_repeats)")
    m.add_argument("--no-report", action="store_true", help="do not re-write the report at the end")
    return p


def _plugin_argument(parser: argparse.ArgumentParser) -> None:
    """``--plugin``: a file or module registering methods of one's own (an experiment file's
    ``plugins`` does this for ``compare``)."""
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE_OR_MODULE",
        help="import a .py file or module that registers your own methods with tc.register (repeatable)",
    )


# the weight dtypes a model loads in (`tokencomp.experiment.DTYPES` maps them to torch's; named here so
# that building the parser, for --help, imports neither torch nor transformers)
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def _load_arguments(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--device`` and ``--dtype``: where and in what precision models are loaded."""
    parser.add_argument("--device", default=None, help=f"torch device for the model, e.g. cuda (default cpu){note}")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=list(DTYPE_NAMES),
        help=f"weight dtype (default float32){note}",
    )


def _generate(args) -> int:
    import tokencomp as tc
    from tokencomp.data import load_rgb

    params = dict(args.param)
    if args.budget is not None:
        params["budget"] = args.budget
    strategy = tc.method(args.method, **params)  # validates name and parameter names first
    from .data import check_image, fill_template

    for path in args.image:  # before the model loads: missing, a folder, not an image, truncated
        problem = check_image(Path(path))
        if problem:
            raise tc.TokencompError(problem)
    from .experiment import DTYPES, model_load_options

    if args.template is not None:
        fill_template(args.template, "")  # an unknown name or a string without {question}: refused before loading

    opts = model_load_options({"name": args.model}, args.device, args.dtype)  # checked before loading
    model = tc.load_model(args.model, device=opts["device"], dtype=DTYPES[opts["dtype"]])
    images = [load_rgb(p) for p in args.image]
    token = getattr(model.processor, "image_token", "<image>")
    prompt = args.prompt
    if token not in prompt:
        prompt = fill_template(args.template or model.family, prompt, len(images), token)
    out = tc.generate(model, [images], [prompt], method=strategy, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({"text": out.text[0], "tokens": out.tokens[0], "record": out.record.to_dict()}, indent=1))
    else:
        rec = out.record
        # both entering the decoder, before any in-LLM pruning (DivPrune's at layer 0 included)
        newlines = sum(rec.span_tokens[0]) - rec.visual_tokens_llm[0]  # LLaVA-NeXT's row ends, if any
        into = f"{rec.visual_tokens_llm[0]} visual" + (f" + {newlines} newline" if newlines else "")
        print(out.text[0])
        print(
            f"[{strategy}] image tokens {rec.visual_tokens_in[0]} in the prompt (newlines included) -> {into} "
            f"tokens into the LLM; tokens per layer {rec.tokens_per_layer[0]}; prefill {rec.prefill_s * 1e3:.1f} ms",
            file=sys.stderr,
        )
    return 0


def _methods(name: str | None) -> int:
    """Each public method on one line (stage, parameters with defaults) with its summary below; or,
    for ``name``, its parameters, its class docstring and its module's (the algorithm, the paper,
    the options where the authors' code and paper differ)."""
    import dataclasses
    import inspect
    import sys
    import textwrap

    import tokencomp as tc

    def summary(cls) -> str:
        own = cls.__dict__.get("__doc__") or ""
        generated = own.startswith(f"{cls.__name__}(")  # the signature a dataclass writes without one
        return "" if generated else inspect.cleandoc(own)

    names = [n for n in tc.available_methods() if not n.startswith("_")] if name is None else [name]
    for n in names:
        cls = tc.method_class(n)  # an unknown name lists the known ones
        params = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        print(f"{n:12s} [{cls.stage}] {params}")
        doc = summary(cls)
        if name is None:
            if doc:
                print(
                    textwrap.fill(
                        " ".join(doc.split("\n\n")[0].split()), 100, initial_indent=" " * 13, subsequent_indent=" " * 13
                    )
                )
            continue
        module = inspect.getdoc(sys.modules[cls.__module__]) or ""
        print("\n" + "\n\n".join(part for part in (doc, module) if part))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tokencomp`` command."""
    args = build_parser().parse_args(argv)
    from .errors import TokencompError

    exp = None  # the loaded experiment, named when a compare run is interrupted
    try:
        if getattr(args, "plugin", None):
            from .experiment import import_plugins

            import_plugins(args.plugin, Path.cwd())
        if args.command == "generate":
            return _generate(args)
        if args.command == "methods":
            return _methods(args.name)
        if args.command == "compare":
            from .distributed import close, launched
            from .runner import load_experiment, run_experiment

            exp = load_experiment(args.experiment, args.out, device=args.device, dtype=args.dtype)
            procs = launched()  # one process, or one of a torchrun / accelerate launch
            if procs.main and procs.world > 1:
                print(
                    f"data-parallel: {procs.world} processes, each running every {procs.world}-th batch",
                    file=sys.stderr,
                )
            try:
                results = run_experiment(
                    exp, progress=procs.main, side_by_side=not args.per_cell_latency, processes=procs
                )
            finally:
                close(procs)
            if procs.main:
                print(f"results: {results}")
                if not args.no_report:
                    from .report import make_report

                    print(f"report: {make_report(exp.out)}")
            return 0
        if args.command == "remeasure":
            from .runner import remeasure_latency

            print(f"results: {remeasure_latency(args.run_dir, args.repeats)}")
            if not args.no_report:
                from .report import make_report

                print(f"report: {make_report(args.run_dir)}")
            return 0
        if args.command == "report":
            from .report import make_report
            from .runner import run_in_progress

            partial = run_in_progress(args.run_dir)
            if partial and args.wait:
                print(f"tokencomp: waiting for the run working in {args.run_dir} to finish", file=sys.stderr)
                partial = run_in_progress(args.run_dir, wait=True)
            elif partial:
                print(
                    f"tokencomp: warning: a run is still working in {args.run_dir}; this report is partial "
                    "(--wait waits for it)",
                    file=sys.stderr,
                )
            print(f"report: {make_report(args.run_dir, partial=partial)}")
            return 0
    except TokencompError as e:
        print(f"tokencomp: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output's reader stopped early (`tokencomp methods | head`)
        if args.command not in ("methods", "generate"):  # a long run's broken pipe is not a reader's choice
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except KeyboardInterrupt:
        if args.command not in ("compare", "remeasure"):
            raise
        if args.command == "remeasure":
            said = f"the groups already re-timed are kept in {args.run_dir}; run it again to re-time all."
        else:
            where = exp.out if exp is not None else args.out or "the run folder"
            if exp is not None and not Path(exp.out).is_dir():  # stopped while a new run was being set up
                said = f"The run had not started; nothing was kept in {where}."
            else:
                said = (
                    f"Finished cells and their predictions are kept in {where}; run the same command again to resume."
                )
        print(f"\ntokencomp: interrupted. {said}", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
