"""Stage 1, vision encoding: the vision tower run layer by layer with only the captures the
strategies declared (the CLS row, every row's mean, keys) at the layers they name, the vision
strategy on every view, the projector on the kept tokens, and each image's tokens laid out by the
model family (`tokencomp.families`)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import torch

from .. import kernels
from ..errors import TokencompError
from ..layout import filled_slots
from ..strategy import (
    CLS_NEEDS,
    VISION_NEEDS,
    TowerContext,
    ViewTokens,
    VisionView,
)
from .captures import capture_outputs

if TYPE_CHECKING:
    from ..engine import Batch


class VisionStage:
    """Encodes a batch's images (a mixin of `tokencomp.Engine`: reads its ``model``, ``options``,
    ``vision`` strategy, ``needs`` and the vision-layer plan `Engine.__init__` derives from them)."""

    # vision stage
    @torch.no_grad()
    def encode_images(self, batch: Batch, spans) -> tuple[list[dict], dict]:
        """Run the vision tower, the vision strategy and the projector.

        Returns a per-image list of assembled tokens (``feats (m, d)``, ``kind``, ``patch``,
        ``offset`` (position in the uncompressed image span, -1 unknown)) and the raw captures.
        """
        m = self.model
        if batch.pixel_values is None:
            return [], {}
        n_images = batch.pixel_values.shape[0]
        sizes = self._image_sizes(batch, n_images)
        pix, role, image, key, crop_grid, crop_window, valid, share = [], [], [], [], [], [], [], []
        img = 0
        for sample in spans:
            for local in range(len(sample)):
                layout = m.layout
                nv = layout.views_per_image(sizes[img])
                p = batch.pixel_values[img]
                pix.append(p[None] if p.dim() == 3 else p[:nv])  # as `Layout.check_views` checked
                role += list(range(nv))
                image += [img] * nv
                key += [local * 1000 + r for r in range(nv)]
                crop_grid.append(layout.crop_grid(sizes[img]))
                crop_window.append(layout.crop_window(sizes[img]) if nv > 1 else (0, 0, 0, 0))
                valid.append(layout.view_valid(sizes[img]))
                share += layout.view_share(sizes[img])
                img += 1
        dev = m.device
        given = torch.cat(pix)  # as the processor made them (float32, on the host)
        dtype = m.vision_model.embeddings.patch_embedding.weight.dtype
        grid = m.grid
        if self.tower is None:
            pixel = given.to(dev, dtype)
        else:  # the tower strategy may run a smaller image (resampled in float32, then cast)
            patch = m.hf.config.vision_config.patch_size
            full = given.to(dev)
            pixel = self.tower.resize(full, patch)
            h, w = pixel.shape[-2:]
            if pixel.shape != full.shape and (h % patch or w % patch or not h or not w):
                raise TokencompError(
                    f"{self.tower}.resize gave {h}x{w} pixels: not a positive multiple of the {patch}-pixel patch"
                )
            pixel = pixel.to(dtype)
            grid = (h // patch, w // patch)
        feats, captures, layer_tokens = self._vision_tower(pixel, interpolate=grid != m.grid)
        # the views' bookkeeping in one upload (each upload waits for the copy)
        meta = torch.cat([torch.tensor([role, image, key]).flatten(), torch.cat(valid).flatten().long()]).to(dev)
        nv = len(role)
        view = VisionView(
            features=feats[:, 1:] if m.has_cls else feats,
            cls=feats[:, 0] if m.has_cls else None,
            grid=grid,
            valid=meta[3 * nv :].view(nv, m.patches_per_view).bool(),
            role=meta[:nv],
            image=meta[nv : 2 * nv],
            key=meta[2 * nv : 3 * nv],
            crop_grid=crop_grid,
            crop_window=crop_window,
            captures=captures,
            backend=self.options.kernel_backend,
            pixels=given,
            share=share,
        )
        if self.tower is not None:  # the tower's grid (laid out as a pooled one), or merged tokens
            k = view.features.shape[1]
            merged = k != grid[0] * grid[1]
            out = ViewTokens(
                features=view.features,
                index=torch.full((nv, k), -1, device=dev),
                count=torch.full((nv,), k, device=dev),
                grid=None if merged else grid,
            )
            counts = [k] * nv
        elif self.vision is None:
            n = m.patches_per_view
            out = ViewTokens(
                features=view.features,
                index=torch.arange(n, device=dev).expand(nv, n),
                count=torch.full((nv,), n, device=dev),
                grid=m.grid,
            )
            counts = [n] * nv
        else:
            out = self.vision.compress(view)
            counts = out.count.tolist()  # tokens per view: one read for all images
        projected = self._project(out, counts)
        images, first, views_of = [], 0, Counter(image)
        for i in range(n_images):  # image i's views are consecutive, its base view first
            rows = range(first, first + views_of[i])
            tok = m.layout.assemble(out, projected, rows, counts, sizes[i], crop_grid[i], self)
            tok["share"] = share[rows.start : rows.stop]  # its views' shares (`Layout.view_share`), for the record
            tok["layer_tokens"] = layer_tokens  # per encoder layer run: tokens per view into its attention, its MLP
            images.append(tok)
            first = rows.stop
        pending = [tok for tok in images if "trim" in tok]
        if pending:  # crop tokens placed back on the grid: one read of how many each image keeps
            kept = torch.stack([tok["trim"][2] for tok in pending]).tolist()
            for tok, (main, extra) in zip(pending, kept):
                m.layout.trim(tok, main, extra)
        return images, captures

    def _vision_tower(
        self, pixel: torch.Tensor, interpolate: bool = False
    ) -> tuple[torch.Tensor, dict, list[list[int]]]:
        """``(features (V, T, d_v) at the projector's input layer(s), captures, tokens per view
        into each layer's attention and MLP)`` (the counts: empty without a tower strategy).
        ``interpolate``: pixels of another size than the tower's, its position embeddings interpolated."""
        m = self.model
        vm = m.vision_model
        cap_layers = set(self.vision_capture_layers)
        h = vm.embeddings(pixel, interpolate_pos_encoding=True) if interpolate else vm.embeddings(pixel)
        h = vm.pre_layrnorm(h) if hasattr(vm, "pre_layrnorm") else h
        hidden = {0: h}
        captures = {}
        size, layer_tokens = None, []  # size: (V, n) once the tower strategy has reduced
        for i in range(self.vision_layers_run):
            layer = m.vision_layers_list[i]
            if self.tower is not None:
                n_in = h.shape[1]
                if i in self.tower_layers or (size is not None and self.tower.proportional):
                    h, size = self._tower_layer(layer, i, h, size)
                else:
                    h = layer(h, None)
                layer_tokens.append([n_in, h.shape[1]])
                hidden[i + 1] = h
                continue
            if i >= self.vision_layers_run - self.vision_qk_layers:  # q/k of a layer whose output feeds nothing
                x = layer.layer_norm1(h)
                rows = self.vision_qk_queries
                got = {
                    "q_proj": layer.self_attn.q_proj(x if rows is None else x[:, :rows]),
                    "k_proj": layer.self_attn.k_proj(x),
                }
                self._vision_scores(layer.self_attn, got, i, captures)
                continue
            if i in cap_layers:
                with capture_outputs(layer.self_attn, ["q_proj", "k_proj"]) as got:
                    h = layer(h, None)
                self._vision_scores(layer.self_attn, got, i, captures)
            else:
                h = layer(h, None)
            hidden[i + 1] = h
        feats = torch.cat([hidden[f] for f in self.feature_hidden], dim=-1)
        return feats, captures, layer_tokens

    def _tower_layer(self, layer, i: int, h: torch.Tensor, size: torch.Tensor | None):
        """Encoder layer ``i`` as the layer itself computes it (norm, attention, residual, norm, MLP,
        residual), with ``log(size)`` added to the attention logits of every key once tokens stand
        for several (proportional attention), and the tower strategy's reduction between the
        attention and the MLP where it reduces. Returns ``(hidden, size)``."""
        attn = layer.self_attn
        reduces = i in self.tower_layers
        bias = None
        if size is not None and self.tower.proportional:  # (V, 1, 1, n): added to every query row's logits
            bias = size.log()[:, None, None, :].to(h.dtype)
        x = layer.layer_norm1(h)
        with capture_outputs(attn, ["k_proj"] if reduces else []) as got:
            h = h + attn(hidden_states=x, attention_mask=bias)[0]
        if reduces:
            v, n, _ = h.shape
            keys = got["k_proj"].view(v, n, attn.num_heads, -1).mean(2)  # the layer's keys, head mean
            ones = torch.ones(v, n, device=h.device) if size is None else size
            left = sum(1 for lay in self.tower_layers if lay >= i)
            ctx = TowerContext(i, h, keys, ones, self.model.has_cls, left, self.options.kernel_backend)
            h, reduced = self.tower.reduce(ctx)
            # sizes from the first reduction on (until then every token is one patch: no bias, as released)
            size = reduced if size is not None or h.shape[1] != n else None
        return h + layer.mlp(layer.layer_norm2(h)), size

    def _vision_scores(self, attn, got, layer: int, captures: dict) -> None:
        nl = self.model.vision_num_layers
        q, k = got["q_proj"], got["k_proj"]
        v, n, _ = k.shape
        heads = attn.num_heads
        kh = k.view(v, n, heads, -1).transpose(1, 2)  # (V, H, n, hd)
        be = self.options.kernel_backend
        mine = [need for need in self.needs if need.kind in VISION_NEEDS and need.layer % nl == layer]
        if any(need.kind in CLS_NEEDS for need in mine):
            qh = q[:, :1].view(v, 1, heads, -1).transpose(1, 2)  # (V, H, 1, hd): the CLS query only
            logits, probs = kernels.attention_rows(qh, kh, attn.scale, backend=be)
            logits, probs = logits.squeeze(2), probs.squeeze(2)  # (V, H, n)
        if any(need.kind == "vision_mean_logits" for need in mine):  # logits are linear in the query
            qm = q.float().mean(1, keepdim=True).to(q.dtype).view(v, 1, heads, -1).transpose(1, 2)
            mean_logits = kernels.attention_rows(qm, kh, attn.scale, backend=be)[0].squeeze(2)  # (V, H, n)
        mean = None  # once per layer, however its needs name it (-2 and nl - 2)
        for need in mine:
            if need.kind == "vision_mean_attention":  # all query rows, a chunk at a time (no n x n map kept)
                if mean is None:
                    qa = q.view(v, n, heads, -1).transpose(1, 2)
                    mean = kh.new_zeros((v, heads, n), dtype=torch.float32)
                    for s in range(0, n, 256):
                        _, p = kernels.attention_rows(qa[:, :, s : s + 256].contiguous(), kh, attn.scale, backend=be)
                        mean += p.float().sum(2)
                    mean /= n
                captures[need] = mean
                continue
            if need.kind == "vision_cls_logits":
                captures[need] = logits
            elif need.kind == "vision_mean_logits":
                captures[need] = mean_logits
            elif need.kind == "vision_cls_attention":
                captures[need] = probs
            elif need.kind == "vision_cls_query":
                captures[need] = q[:, 0]
            elif need.kind == "vision_keys_full":
                captures[need] = k
            else:
                captures[need] = kh.float().mean(1)  # (V, n, hd) head-mean keys

    def _project(self, out: ViewTokens, counts: list[int]) -> torch.Tensor:
        """``(V, k, d_v) -> (V, k, d)``: the projector on the real rows only (``counts`` per view),
        padding rows zero."""
        nv, k = out.index.shape
        x = out.features.flatten(0, 1)
        if sum(counts) == nv * k:  # no padding
            flat = self.model.projector(x)
            return flat.view(nv, k, flat.shape[-1])
        rows = filled_slots(out.count, k, sum(counts))
        flat = self.model.projector(kernels.gather_tokens(x[None], rows[None], backend=self.options.kernel_backend)[0])
        return flat.new_zeros(nv * k, flat.shape[-1]).index_copy_(0, rows, flat).view(nv, k, flat.shape[-1])
