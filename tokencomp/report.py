"""``tokencomp report RUN_DIR``: tables and plots from a compare run's saved results.

Writes ``report.md``, a self-contained ``report.html`` (plots embedded) and ``plots/*.png``:
accuracy vs prefill TFLOPs with the Pareto frontier, accuracy vs visual tokens, prefill latency vs
tokens per layer, measured vs FLOPs-ideal speed-up, tokens per layer per method, and kept-token
overlays on sample images per method.
"""

from __future__ import annotations

import base64
import html
import re
import textwrap
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from adjustText import adjust_text  # noqa: E402
from PIL import Image  # noqa: E402

from ._compat import tomllib  # noqa: E402
from .data import is_unmodified, read_rows, write_atomic  # noqa: E402
from .errors import TokencompError  # noqa: E402
from .provenance import codes_of, split_code  # noqa: E402

PLOTS = ("accuracy_vs_tflops", "accuracy_vs_tokens", "latency_vs_tokens", "speedup", "tokens_per_layer", "overlays")


def _dtype_note(g) -> str:
    """``", float16"`` for a group run in another dtype than float32 (rows from before the field say nothing)."""
    if "dtype" not in g or g["dtype"].isna().all():
        return ""
    dtypes = sorted(set(g["dtype"].dropna()))
    return "" if dtypes == ["float32"] else ", " + "/".join(dtypes)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points not dominated by any other (lower x and higher y are better), by x."""
    order = np.lexsort((-y, x))
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return np.array(front, dtype=int)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def method_styles(methods) -> dict[str, dict]:
    """One look per method, the same in every plot: 20 colours (tab20), then the next marker, so
    that up to 200 methods stay distinct (the unmodified model first: black circles)."""
    colours = plt.get_cmap("tab20").colors
    styles, i = {}, 0
    for m in dict.fromkeys(methods):
        if m == "identity":
            styles[m] = {"color": "black", "marker": "o"}
            continue
        styles[m] = {"color": colours[i % 20], "marker": MARKERS[i // 20 % len(MARKERS)]}
        i += 1
    return styles


def _scatter(ax, df, x, y, xlabel, ylabel, title, front=False, styles=None):
    texts, labels = [], {}
    xs, ys = df[x].to_numpy(float), df[y].to_numpy(float)
    dx, dy = (np.ptp(xs) or 1.0) / 200, (np.ptp(ys) or 1.0) / 200
    styles = styles or method_styles(df["method"])
    for _, r in df.iterrows():
        ax.scatter(r[x], r[y], s=36, zorder=3, **styles[r["method"]])
        ci = r.get(f"{y}_ci95")
        if isinstance(ci, list):  # the bootstrap 95% interval of an accuracy
            ax.errorbar(r[x], r[y], yerr=[[r[y] - ci[0]], [ci[1] - r[y]]], fmt="none", ecolor="0.6", lw=0.8, capsize=2)
        cell = (round(r[x] / dx), round(r[y] / dy))  # methods on (nearly) the same point share a label
        labels.setdefault(cell, (r[x], r[y], []))[2].append(str(r["method"]))
    for values, set_lim in ((xs, ax.set_xlim), (ys, ax.set_ylim)):
        if len(values) and not np.ptp(values):  # one value (e.g. every accuracy 0): a range around it
            pad = 0.05 * (abs(values[0]) or 1.0)
            set_lim(values[0] - pad, values[0] + pad)
    for px, py, names in labels.values():
        # one line per method, long names (option-derived labels) wrapped at their hyphens
        texts.append(ax.text(px, py, "\n".join(textwrap.fill(n, 24) for n in names), fontsize=7))
    if len(texts) > 1:  # labels of close points moved apart (and off the points), each tied to its point by a thin line
        adjust_text(
            texts,
            x=xs,
            y=ys,
            ax=ax,
            expand=(1.15, 1.4),
            force_text=(0.3, 0.5),
            max_move=(40, 40),
            arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5},
        )
    if front and len(df) > 1:
        f = pareto_front(df[x].to_numpy(float), df[y].to_numpy(float))
        ax.plot(df[x].to_numpy()[f], df[y].to_numpy()[f], "k--", lw=1, label="Pareto frontier")
        ax.legend(fontsize=8, loc="lower right", framealpha=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def _overlay(ax, image_path: str, patches: list[int], grid, family: str) -> None:
    im = Image.open(image_path).convert("RGB")
    side = 336
    if family == "llava":  # shortest edge to the view size, then a centre crop (CLIP processing)
        w, h = im.size
        s = side / min(w, h)
        im = im.resize((max(side, round(w * s)), max(side, round(h * s))))
        w, h = im.size
        im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    else:  # LLaVA-NeXT thumbnail: the whole image resized to the view
        im = im.resize((side, side))
    gh, gw = grid
    mask = np.zeros(gh * gw)
    mask[[p for p in patches if 0 <= p < gh * gw]] = 1
    ax.imshow(im)
    ax.imshow(mask.reshape(gh, gw), cmap="Reds", alpha=0.45, extent=(0, side, side, 0), vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def _title(run: Path) -> str:
    """The experiment's ``[experiment] name`` from the run's copy of its file, else the folder name."""
    try:
        return str(tomllib.loads((run / "experiment.toml").read_text())["experiment"]["name"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return run.name


def make_report(run_dir: str | Path, overlay_samples: int = 3, partial: bool = False) -> Path:
    """Write the report of ``run_dir``; returns the path of ``report.md``.

    Needs ``results.jsonl``; the overlay plots also need ``predictions/`` (the images' kept
    patches). A copy without it (as ``experiments/results`` keeps) keeps the overlay plots it
    already has and leaves out the others. ``partial``: a run is still working in the directory
    (`tokencomp.runner.run_in_progress`); the report says so at its top. Each file is replaced
    whole (a crash leaves the previous report)."""
    run = Path(run_dir)
    results = run / "results.jsonl"
    if not results.is_file():
        raise TokencompError(f"{run} has no results.jsonl; run `tokencomp compare` first")
    rows = read_rows(results)
    if not rows:
        raise TokencompError(f"{results} is empty")
    df = pd.DataFrame(rows)
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    sections, images, summary = [], [], []
    styles = method_styles(df["method"])  # one look per method across every model and dataset
    for (model, dataset), g in df.groupby(["model", "dataset"], sort=False):
        g = g.reset_index(drop=True)
        tag = _slug(f"{model}_{dataset}")
        files = {}
        fig, ax = plt.subplots(figsize=(6, 4.2))
        _scatter(
            ax,
            g,
            "prefill_tflops",
            "accuracy",
            "LLM prefill TFLOPs (per sample)",
            "accuracy",
            f"{model} / {dataset}",
            front=True,
            styles=styles,
        )
        files["accuracy_vs_tflops"] = plots / f"accuracy_vs_tflops_{tag}.png"
        fig.tight_layout()
        fig.savefig(files["accuracy_vs_tflops"], dpi=110)
        plt.close(fig)

        # in-LLM methods keep every token at first: their tokens are the mean over the decoder layers
        layer_mean = "visual_tokens_mean" in g and bool(g["visual_tokens_mean"].notna().all())
        x, xlabel = (
            ("visual_tokens_mean", "visual tokens, mean over the decoder layers (newlines not counted)")
            if layer_mean
            else ("visual_tokens_llm", "visual tokens entering the LLM")
        )
        fig, ax = plt.subplots(figsize=(6, 4.2))
        _scatter(ax, g, x, "accuracy", xlabel, "accuracy", f"{model} / {dataset}", styles=styles)
        files["accuracy_vs_tokens"] = plots / f"accuracy_vs_tokens_{tag}.png"
        fig.tight_layout()
        fig.savefig(files["accuracy_vs_tokens"], dpi=110)
        plt.close(fig)

        g = g.assign(mean_tokens=[float(np.mean(t)) for t in g["tokens_per_layer"]])
        fig, ax = plt.subplots(figsize=(6, 4.2))
        _scatter(
            ax,
            g,
            "mean_tokens",
            "prefill_ms",
            "mean tokens per decoder layer",
            "prefill latency (ms, median)",
            f"{model} / {dataset} ({g['device'].iloc[0]}{_dtype_note(g)}, batch {g['latency_batch_size'].iloc[0]})",
            styles=styles,
        )
        files["latency_vs_tokens"] = plots / f"latency_vs_tokens_{tag}.png"
        fig.tight_layout()
        fig.savefig(files["latency_vs_tokens"], dpi=110)
        plt.close(fig)

        base = g[[is_unmodified(r) for r in g.to_dict("records")]]
        ref = base.iloc[0] if len(base) else g.loc[g["total_prefill_tflops"].idxmax()]
        g = g.assign(
            ideal_speedup=ref["total_prefill_tflops"] / g["total_prefill_tflops"],
            measured_speedup=ref["prefill_ms"] / g["prefill_ms"],
        )
        fig, ax = plt.subplots(figsize=(7.5, 5))
        _scatter(
            ax,
            g,
            "ideal_speedup",
            "measured_speedup",
            f"FLOPs-ideal speed-up vs {ref['method']} (x)",
            "measured prefill speed-up (x)",
            f"{model} / {dataset}",
            styles=styles,
        )
        lim = max(g["ideal_speedup"].max(), g["measured_speedup"].max()) * 1.05
        ax.plot([0, lim], [0, lim], color="grey", lw=1, label="measured = ideal")
        ax.legend(fontsize=8, loc="upper left", framealpha=0.8)
        files["speedup"] = plots / f"speedup_{tag}.png"
        fig.tight_layout()
        fig.savefig(files["speedup"], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(8.5, 4.2))
        for _, r in g.iterrows():  # each method's colour and marker, as in the other plots
            ax.plot(
                range(len(r["tokens_per_layer"])), r["tokens_per_layer"], label=r["method"], ms=4, **styles[r["method"]]
            )
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("tokens processed (mean per sample)")
        ax.set_title(f"tokens per layer: {model} / {dataset}", fontsize=10)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(g) // 24)  # beside the plot
        ax.grid(alpha=0.3)
        files["tokens_per_layer"] = plots / f"tokens_per_layer_{tag}.png"
        fig.tight_layout()
        fig.savefig(files["tokens_per_layer"], dpi=110, bbox_inches="tight")
        plt.close(fig)

        if "delta_vs_identity" in g and g["delta_vs_identity"].map(lambda v: isinstance(v, list)).any():
            files["paired_difference"] = plots / f"paired_difference_{tag}.png"
            _paired_plot(g, styles, f"{model} / {dataset}", files["paired_difference"])

        preds = {  # the scored samples (skipped ones, of a lazily validated dataset, have no tokens to draw)
            r["method"]: [p for p in read_rows(run / "predictions" / f"{r['cell']}.jsonl") if "score" in p]
            for _, r in g.iterrows()
        }
        n_img = min(overlay_samples, min(len(p) for p in preds.values()))
        shown = {m: [_image(run, p[i]["image"]) for i in range(n_img)] for m, p in preds.items()}
        if any(None in found for found in shown.values()):
            n_img = 0  # images not at hand (a copy of the run without its data): no overlays drawn
        overlay = plots / f"overlays_{tag}.png"
        if n_img:
            _overlays(g, preds, shown, f"{model} / {dataset}", overlay)
        if overlay.is_file():  # drawn now, or kept from the run when the predictions are not at hand
            files["overlays"] = overlay

        cols = [
            "method",
            "samples",
            "accuracy",
            "visual_tokens_llm",
            *(["visual_tokens_mean"] if layer_mean else []),
            "prefill_tflops",
            "total_prefill_tflops",
            "overhead_tflops",
            "prefill_ms",
            "decode_ms_per_token",
            *(["peak_memory_mb"] if _gpu_memory(g) else []),
            *(["kv_cache_mb"] if "kv_cache_mb" in g else []),
            "ideal_speedup",
            "measured_speedup",
        ]
        table = _with_intervals(g, cols).to_markdown(index=False, floatfmt=".4g")
        sections.append((f"{model} / {dataset}", table, files))
        summary += _summary(f"{model} / {dataset}", g)
        images += list(files.values())

    unit = rows[0].get("flops_unit", "FLOPs")
    experiment = _title(run)
    intro, noise = (
        f"FLOPs are {unit}; TFLOPs per sample. {_latency_note(rows)}",
        _noise_note(rows) + _code_note(rows) + _cut_note(run, rows),
    )
    if partial:
        noise = [
            f"**Partial report**: a run was still working in this directory when it was written "
            f"({time.strftime('%Y-%m-%d %H:%M')}); its unfinished cells are missing. Write it again when the run "
            "is done (`tokencomp report --wait RUN_DIR` waits for it).",
            "",
            *noise,
        ]
    md = [f"# tokencomp report: {experiment}", "", "## Summary", "", *summary, "", intro, "", *noise, *COLUMNS, ""]
    page = [
        f"<html><head><meta charset='utf-8'><title>tokencomp report {html.escape(experiment)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 8px}"
        ".scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px;white-space:nowrap}"
        "td:first-child,th:first-child{position:sticky;left:0;background:#fff}img{max-width:100%}</style></head><body>",
        f"<h1>tokencomp report: {html.escape(experiment)}</h1>",
        "<h2>Summary</h2><ul>",
        *(f"<li>{item}</li>" for item in _items(summary)),
        "</ul>",
        f"<p>{html.escape(intro)}</p>",
        *(f"<p>{_md_inline(line)}</p>" for line in noise if line),
        f"<p>{_md_inline(COLUMNS[0])}</p><ul>",
        *(f"<li>{_md_inline(line.removeprefix('- '))}</li>" for line in COLUMNS[2:]),
        "</ul>",
    ]
    for title, table, files in sections:
        md += [f"## {title}", "", table, ""]
        md += [f"![{k}](plots/{v.name})" for k, v in files.items()] + [""]
        page.append(f"<h2>{html.escape(title)}</h2>")
        page.append(
            f"<div class='scroll'>{_md_table_to_html(table)}</div>"
        )  # wide tables scroll, the method column stays
        for k, v in files.items():
            data = base64.b64encode(v.read_bytes()).decode()
            page.append(f"<h3>{k}</h3><img alt='{k}' src='data:image/png;base64,{data}'/>")
    page.append("</body></html>")
    write_atomic(run / "report.md", "\n".join(md))
    write_atomic(run / "report.html", "\n".join(page))
    return run / "report.md"


def _image(run: Path, stored: str) -> Path | None:
    """A prediction row's image: relative to the run dir, or (rows written before they were) to
    the folder the run was made from; absolute as is; None when it is not at hand."""
    path = Path(stored)
    for candidate in [path] if path.is_absolute() else [run / path, path]:
        if candidate.is_file():
            return candidate
    return None


def _budget_unit(name) -> str:
    """What a method's ``budget`` counts: ``"per view"`` (vision and tower stages), ``"per image"``
    (in the LLM), or ``""`` for a method not registered here (a plugin the report cannot see)."""
    from .errors import UnknownMethodError
    from .registry import method_class

    try:
        stage = method_class(str(name)).stage
    except UnknownMethodError:
        return ""
    return "per view" if stage in ("vision", "tower") else "per image"


def _summary(title: str, g: pd.DataFrame) -> list[str]:
    """What a reader needs first about one model and dataset (``g``: its rows, with the speed-up
    columns): the unmodified accuracy, the Pareto set, the best method at each budget, the largest
    measured speed-up, and which differences to the unmodified model its questions can support."""

    def acc(r) -> str:
        ci = r.get("accuracy_ci95")
        return f"{r['accuracy']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, list) else "")

    rows = [r for _, r in g.iterrows()]
    base = [r for r in rows if is_unmodified(r)]
    out = [f"- **{title}** ({int(g['samples'].max())} questions)" + (f": unmodified {acc(base[0])}." if base else ".")]
    front = pareto_front(g["prefill_tflops"].to_numpy(float), g["accuracy"].to_numpy(float))
    out.append(
        "  Pareto set (accuracy vs LLM prefill TFLOPs): " + ", ".join(f"`{g['method'][i]}`" for i in front) + "."
    )
    budgets: dict[tuple[int, str], list] = {}
    for r in rows:
        spec = r.get("spec") if isinstance(r.get("spec"), list) else []
        budget = spec[0].get("budget") if spec and isinstance(spec[0], dict) else None
        if isinstance(budget, int) and not isinstance(budget, bool):
            budgets.setdefault((budget, _budget_unit(spec[0].get("name"))), []).append(r)
    if budgets:
        keys = sorted(budgets, key=lambda k: (k[1] != "per view", k[1], -k[0]))  # per view first, large to small
        out.append(
            "  Best at each `budget` (a vision or tower method's is per view, an in-LLM method's per image): "
            + "; ".join(
                f"{b}{' ' + unit if unit else ''}: `{r['method']}` {acc(r)}"
                for (b, unit), r in ((k, max(budgets[k], key=lambda r: r["accuracy"])) for k in keys)
            )
            + "."
        )
    if "measured_speedup" in g and len(g) > 1:
        fast = g.loc[g["measured_speedup"].idxmax()]
        out.append(
            f"  Largest measured prefill speed-up: `{fast['method']}` {fast['measured_speedup']:.2f}x "
            f"(FLOPs-ideal {fast['ideal_speedup']:.2f}x)."
        )
    paired = [r for r in rows if isinstance(r.get("delta_vs_identity"), list) and not is_unmodified(r)]
    if paired:
        excludes_zero = [r["delta_vs_identity"][1] > 0 or r["delta_vs_identity"][2] < 0 for r in paired]
        sig = [r for r, x in zip(paired, excludes_zero) if x]
        same = [r for r, x in zip(paired, excludes_zero) if not x]
        out.append(
            f"  Differ from the unmodified model (paired 95% interval excludes 0): {len(sig)} of {len(paired)}"
            + (": " + ", ".join(f"`{r['method']}` {r['delta_vs_identity'][0]:+.3f}" for r in sig) if sig else "")
            + "."
            + (
                f" The other {len(same)} cannot be told apart from it on these questions (more questions narrow the"
                " intervals), nor ranked against each other where their intervals overlap."
                if same
                else ""
            )
        )
    return out


def _paired_plot(g: pd.DataFrame, styles: dict, where: str, path: Path) -> None:
    """Each method's accuracy difference to the unmodified model on the same questions, with its
    paired bootstrap 95% interval; an interval that excludes 0 is drawn solid (significant)."""
    rows = [r for _, r in g.iterrows() if isinstance(r.get("delta_vs_identity"), list) and not is_unmodified(r)]
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.28 * max(len(rows), 1)))
    for i, r in enumerate(rows):
        d, lo, hi = r["delta_vs_identity"]
        significant = lo > 0 or hi < 0
        style = styles[r["method"]]
        ax.errorbar(
            d,
            i,
            xerr=[[d - lo], [hi - d]],
            fmt="none",
            ecolor=style["color"],
            capsize=2,
            lw=1.4 if significant else 0.8,
            ls="-" if significant else ":",
        )
        ax.scatter(
            d,
            i,
            s=30,
            zorder=3,
            facecolor=style["color"] if significant else "white",
            edgecolor=style["color"],
            marker=style["marker"],
        )
    ax.axvline(0, color="0.3", lw=0.8)
    ax.set_yticks(range(len(rows)), [str(r["method"]) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy difference to the unmodified model (paired bootstrap 95% interval)")
    ax.set_title(f"{where}: filled = the interval excludes 0", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _overlays(g: pd.DataFrame, preds: dict, images: dict, where: str, path: Path, per_row: int = 6) -> None:
    """Each method's first images (``images``: method -> image paths, its first predictions') with
    its kept base-view tokens in red: one block of tiles per image, ``per_row`` methods a row."""
    n_img = len(next(iter(images.values())))
    rows_per_image = -(-len(g) // per_row)
    fig, axes = plt.subplots(
        n_img * rows_per_image, per_row, figsize=(1.9 * per_row, 2.05 * n_img * rows_per_image + 0.4), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for j, (_, r) in enumerate(g.iterrows()):
        for i in range(n_img):
            ax = axes[i * rows_per_image + j // per_row][j % per_row]
            ax.axis("on")
            p = preds[r["method"]][i]
            _overlay(ax, images[r["method"]][i], p["kept_patches"], r["grid"], r["family"])
            ax.set_title(textwrap.fill(f"{r['method']} (image {i + 1})", 26), fontsize=7)
    fig.suptitle(f"kept base-view tokens (red) at the last layer: {where}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # the title above the tiles' own
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _with_intervals(g: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """The table's columns, with the accuracy's 95% interval and the paired difference to the
    unmodified model after ``accuracy`` where the rows have them."""
    t = g[cols].copy()
    at = cols.index("accuracy") + 1
    if "delta_vs_identity" in g and g["delta_vs_identity"].map(lambda v: isinstance(v, list)).any():
        t.insert(
            at,
            "Δ vs identity [95% CI]",
            g["delta_vs_identity"].map(
                lambda v: f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]" if isinstance(v, list) else ""
            ),
        )
    if "accuracy_ci95" in g and g["accuracy_ci95"].map(lambda v: isinstance(v, list)).any():
        t.insert(
            at,
            "accuracy 95% CI",
            g["accuracy_ci95"].map(lambda v: f"{v[0]:.3f}-{v[1]:.3f}" if isinstance(v, list) else ""),
        )
    return t


COLUMNS = [
    "Columns (token counts and FLOPs: means per sample; latency and KV cache: the latency batch, "
    "`latency_batch_size` samples in results.jsonl; speed-ups: against `identity`, or the cell with the most "
    "FLOPs where there is none, as the speed-up plot names):",
    "",
    "- `visual_tokens_llm`: visual tokens entering the LLM, after any vision-stage method (newline tokens not "
    "counted); an in-LLM method leaves it at the full count and prunes inside.",
    "- `visual_tokens_mean`: visual tokens averaged over the decoder layers, what an in-LLM method keeps on average.",
    "- `prefill_tflops`: the LLM's prefill alone (the x-axis of accuracy vs TFLOPs and its Pareto front).",
    "- `total_prefill_tflops`: the LLM, the vision tower, the projector and the method's overhead; `ideal_speedup` "
    "is the reference's over the method's.",
    "- `overhead_tflops`: the method's own matrix products (its scores, similarities and attention captures).",
    "- `prefill_ms`, `decode_ms_per_token`: medians over timed runs on the latency batch. Prefill is time to first "
    "token from the processor's host tensors: their copy to the device, the vision tower, the projector, the method "
    "and the LLM. `measured_speedup` is the reference's prefill over the method's. It can exceed `ideal_speedup`: the latency batch is left padded "
    "to its longest sample, so the reference computes padding that a method with equal budgets per sample does not (the FLOPs count each sample "
    "unpadded), and fewer tokens also save work that FLOPs do not count (memory traffic, element-wise layers, kernel launches).",
    "- `peak_memory_mb` (CUDA runs only): the most memory allocated during the timed runs (every model of the "
    "experiment is loaded, so it includes their weights: compare within a table). On a CPU the only peak "
    "is the process's resident set, which holds the weights, the Python runtime and memory the allocator keeps "
    "and so grows with the order the cells ran in: it stays in results.jsonl but is not shown.",
    "- `kv_cache_mb`: the latency batch's KV cache at the end of the timed generation.",
]


def _items(lines: list[str]) -> list[str]:
    """HTML of a markdown list whose items continue on indented lines: one string per item."""
    items: list[str] = []
    for line in lines:
        if line.startswith("- "):
            items.append(_md_inline(line[2:]))
        elif items and line.strip():
            items[-1] += "<br>" + _md_inline(line.strip())
    return items


def _md_inline(text: str) -> str:
    """Escaped HTML of one line of the report's markdown: ``**bold**`` and ```code``` kept as such."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _gpu_memory(g: pd.DataFrame) -> bool:
    """Whether every row's peak memory is a CUDA allocator peak (comparable across cells)."""
    return "device" in g and bool(g["device"].map(lambda d: str(d).startswith("cuda")).all())


def _noise_note(rows: list[dict], limit: float = 0.5) -> list[str]:
    """A warning when the latency of some cells spread over more than ``limit`` of their median
    (another job on the machine, most often), or nothing."""
    noisy = [
        r["method"]
        for r in rows
        if r.get("prefill_spread_ms") is not None
        and r.get("prefill_ms")
        and r["prefill_spread_ms"] > limit * r["prefill_ms"]
    ]
    if not noisy:
        return []
    return [
        f"**Noisy latency:** in {len(noisy)} of {len(rows)} cells the prefill times spread over {limit:.0%} of their "
        f"median ({', '.join(sorted(set(noisy))[:6])}{', ...' if len(set(noisy)) > 6 else ''}). Re-time them on an "
        "idle machine with `tokencomp remeasure RUN_DIR`.",
        "",
    ]


def _cut_note(run: Path, rows: list[dict]) -> list[str]:
    """A warning naming finished cells whose predictions file no longer holds a row per sample (cut
    or edited after the cell finished; resuming the run recomputes them), or nothing. A copy of a
    run without its predictions (as ``experiments/results`` keeps) is not checked."""
    cut = []
    for r in rows:
        path = run / "predictions" / f"{r['cell']}.jsonl"
        if path.is_file():
            have = len(read_rows(path))
            if have != r.get("samples", 0) + (r.get("skipped") or 0):
                cut.append(f"{r['method']} on {r['model']} / {r['dataset']} ({have} rows for {r['samples']} samples)")
    if not cut:
        return []
    return [
        f"**Cut predictions**: {'; '.join(cut)}. Their summary rows and paired differences describe rows that are "
        "gone: run the same `tokencomp compare` again to recompute them.",
        "",
    ]


def _code_note(rows: list[dict]) -> list[str]:
    """A warning when the cells were made with more than one version of the code: of the package
    (a run resumed after an update; rows from before rows recorded it count as one more), of a
    method file of one's own (a plugin edited between cells), or within one cell; or nothing.
    Cells whose methods come from different plugin files differ in their codes by design."""
    if not any("code" in r for r in rows):  # a run made before rows recorded their code
        return []
    package, files = set(), {}
    for code in codes_of(rows):
        head, own = split_code(code)
        package.add(head)
        for name, digest in own.items():
            files.setdefault(name, set()).add(digest)
    versions = sorted(package) + [f"{name} ({len(d)} versions)" for name, d in sorted(files.items()) if len(d) > 1]
    within = sorted({r["method"] for r in rows if len(codes_of([r])) > 1})
    if len(package) < 2 and len(versions) == len(package) and not within:
        return []
    return [
        f"**Mixed code:** these cells were made with more than one version of the code ({', '.join(versions)})"
        + (f"; within {', '.join(within)} too" if within else "")
        + ". Where the scoring changed between them their numbers do not compare: `code` in results.jsonl and "
        "in each prediction row says which made what; rerun the cells into a new directory to compare them.",
        "",
    ]


def _latency_note(rows: list[dict]) -> str:
    """How the latency columns were taken, from the rows' ``latency`` field."""
    how = {(r.get("latency") or {}).get("taken") for r in rows}
    if len(how) > 1:
        return (
            "Latency: prefill of the dataset's first batch after warm-up; some cells timed side by side, others "
            "when they finished (the `latency` field of results.jsonl says which): compare within one kind only."
        )
    if how == {"interleaved"}:
        n = min(r["latency"]["repeats"] for r in rows)
        return (
            f"Latency: prefill of the dataset's first batch after warm-up, every method of a model and dataset "
            f"timed side by side ({n}+ interleaved rounds, medians)."
        )
    return "Latency: median prefill of the dataset's first batch after warm-up, each cell timed when it finished."


def _md_table_to_html(table: str) -> str:
    lines = [
        line for line in table.splitlines() if line.strip() and not set(line.replace("|", "").strip()) <= set("-: ")
    ]
    cells = [[html.escape(c.strip()) for c in line.strip().strip("|").split("|")] for line in lines]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"
