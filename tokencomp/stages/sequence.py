"""Stage 2, sequence build: text embeddings with each image's placeholder span replaced by its
assembled tokens, left padded, with a record of every token (kind, original index, image, view,
patch) that follows it through pruning."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import kernels
from ..layout import pad_left
from ..strategy import (
    PAD,
    TEXT,
    VISUAL,
)

if TYPE_CHECKING:
    from ..engine import Batch


@dataclass
class SeqState:
    """The packed, left-padded token sequence of a batch between decoder layers."""

    hidden: torch.Tensor  # (B, n, d)
    valid: torch.Tensor  # (B, n) bool
    kind: torch.Tensor  # (B, n) int8
    positions: torch.Tensor  # (B, n) long
    orig_index: torch.Tensor  # (B, n) long, -1 unknown
    image: torch.Tensor  # (B, n) long, image index within the sample, -1 for text
    view: torch.Tensor  # (B, n) long, 0 = base image / thumbnail, j = crop j, -1 text and newlines
    patch: torch.Tensor  # (B, n) long, source patch index in its view, -1 unknown
    rater: torch.Tensor | None = None  # (B, n) bool, rater tokens a layer strategy marked (or None)

    def layout(self, b: int) -> dict[str, torch.Tensor]:
        """Sample ``b``'s token record without padding: ``kind``, ``positions``, ``orig_index``,
        ``image``, ``view`` and ``patch``, each ``(n_b,)``."""
        v = self.valid[b]
        return {
            name: getattr(self, name)[b][v] for name in ("kind", "positions", "orig_index", "image", "view", "patch")
        }

    def gather(self, index: torch.Tensor, valid: torch.Tensor, backend: str = "auto") -> SeqState:
        def g(t: torch.Tensor) -> torch.Tensor:
            return torch.gather(t, 1, index)

        return SeqState(
            hidden=kernels.gather_tokens(self.hidden, index, backend=backend),
            valid=valid,
            kind=g(self.kind).masked_fill(~valid, PAD),
            positions=g(self.positions),
            orig_index=g(self.orig_index),
            image=g(self.image),
            view=g(self.view),
            patch=g(self.patch),
            rater=None if self.rater is None else g(self.rater) & valid,
        )


class SequenceStage:
    """Builds the token sequence entering the decoder (a mixin of `tokencomp.Engine`)."""

    # sequence build
    def build_sequence(self, batch: Batch, spans, images: list[dict]) -> tuple[SeqState, torch.Tensor, list]:
        """Per sample: text embeddings with each image span replaced by its assembled tokens.

        Returns the packed state, ``(B,)`` visual tokens entering the LLM per sample, and
        ``(tokens per sample, image and view; tokens the projector ran on per sample; the views'
        shares per sample, image and view; a sample's empty when all its views' are 1)``.
        """
        m = self.model
        dev = m.device
        ids = batch.input_ids.to(dev)
        lengths = batch.attention_mask.sum(1).tolist()  # left padded (validate): row b is ids[b, -length:]
        # counts stay on the device until one read at the end (a read per image would wait each time)
        samples, n_visual, view_counts, projected, shares, img = [], [], [], [], [], 0
        for b, sample in enumerate(spans):
            row = ids[b, ids.shape[1] - lengths[b] :]
            emb = m.embed_tokens(row)
            pieces = {k: [] for k in ("hidden", "kind", "orig", "image", "view", "patch", "pos")}
            cursor, vis, views, proj_tokens = 0, torch.zeros((), dtype=torch.long, device=dev), [], 0
            shares.append([])
            for local, (start, length) in enumerate(sample + [(len(row), 0)]):
                t = torch.arange(cursor, start, device=dev)
                pieces["hidden"].append(emb[cursor:start])
                pieces["kind"].append(torch.full((len(t),), TEXT, dtype=torch.int8, device=dev))
                pieces["orig"].append(t)
                pieces["image"].append(torch.full_like(t, -1))
                pieces["patch"].append(torch.full_like(t, -1))
                pieces["view"].append(torch.full_like(t, -1))
                pieces["pos"].append(t)
                if length == 0:
                    break
                tok = images[img]
                k = tok["feats"].shape[0]
                is_vis = tok["kind"] == VISUAL
                vis = vis + is_vis.sum()
                proj_tokens += tok["projected"]
                shares[-1].append(tok["share"])
                nv = tok["num_views"]  # visual tokens per view, a last bin for the rest
                bins = torch.where(is_vis & (tok["view"] >= 0), tok["view"], nv)
                views.append(
                    torch.zeros(nv + 1, dtype=torch.long, device=dev).index_add_(0, bins, torch.ones_like(bins))[:nv]
                )
                off = tok["offset"]
                orig = torch.where(off >= 0, start + off, off)
                # tokens with a source keep their place; those without (merged, pooled) are spread
                # evenly over the image's span: the i-th of c at i * length // c
                none = off < 0
                spread = (none.long().cumsum(0) - 1) * length // none.sum().clamp(min=1)
                pos = start + torch.where(none, spread, off)
                pieces["hidden"].append(tok["feats"].to(emb.dtype))
                pieces["kind"].append(tok["kind"])
                pieces["orig"].append(orig)
                pieces["image"].append(torch.full((k,), local, device=dev))
                pieces["patch"].append(tok["patch"])
                pieces["view"].append(tok["view"])
                pieces["pos"].append(pos)
                cursor = start + length
                img += 1
            s = {k: torch.cat(v) for k, v in pieces.items()}
            if self.options.vision_positions == "contiguous":
                s["pos"] = torch.arange(len(s["kind"]), device=dev)
            samples.append(s)
            n_visual.append(vis)
            view_counts.append(views)
            projected.append(proj_tokens)
        flat = iter(torch.cat([torch.stack(n_visual), *(v for views in view_counts for v in views)]).tolist())
        n_visual = list(itertools.islice(flat, len(samples)))
        per_view = [[list(itertools.islice(flat, len(v))) for v in views] for views in view_counts]
        hidden, valid = pad_left([s["hidden"] for s in samples])
        state = SeqState(
            hidden=hidden,
            valid=valid,
            kind=pad_left([s["kind"] for s in samples], PAD)[0],
            positions=pad_left([s["pos"] for s in samples], 0)[0],
            orig_index=pad_left([s["orig"] for s in samples], -1)[0],
            image=pad_left([s["image"] for s in samples], -1)[0],
            view=pad_left([s["view"] for s in samples], -1)[0],
            patch=pad_left([s["patch"] for s in samples], -1)[0],
        )
        shares = [[] if all(x == 1 for image in sample for x in image) else sample for sample in shares]
        return state, torch.tensor(n_visual), (per_view, projected, shares)
