"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): AnyRes. An image is a thumbnail (the base
view) plus a grid of crops at the pinpoint resolution transformers picks; the crop grid is unpadded
(the rows or columns that only hold padding are dropped) and every row of it is closed by the
model's ``image_newline`` token."""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import unpad_image

from .. import kernels
from ..errors import InputMismatchError, UnsupportedModelError
from ..layout import filled_slots
from ..strategy import NEWLINE, VISUAL
from .llava import Layout


class LlavaNextLayout(Layout):
    """LLaVA-NeXT's layout: thumbnail + unpadded crop grid with newline tokens."""

    family = "llava-next"
    has_crops = True

    def __init__(self, model) -> None:
        super().__init__(model)
        pins, size = model.pinpoints, model.view_size
        odd = [p for p in pins or [] if p[0] % size or p[1] % size]
        if not pins or odd:
            raise UnsupportedModelError(
                f"image_grid_pinpoints {pins} must be (height, width) multiples of the view size "
                f"{size} px (vision_config.image_size){f'; these are not: {odd}' if odd else ''}"
            )

    def image_sizes(self, batch, n_images: int) -> list[tuple[int, int]]:
        """Each image's original ``(height, width)``, from the processor's ``image_sizes``."""
        if n_images == 0:
            return []
        if batch.image_sizes is None or batch.image_sizes.shape[0] != n_images:
            raise InputMismatchError("LLaVA-NeXT needs image_sizes with one (height, width) row per image")
        return [tuple(int(x) for x in s) for s in batch.image_sizes.tolist()]

    def check_views(self, batch) -> None:
        """Each image's views in ``pixel_values`` are the thumbnail and crops its size gives
        (`views_per_image`), the rest zero padding up to the batch's most views; a processor whose
        crops disagree (pinpoints read otherwise) is named before any work."""
        m = self.model
        if batch.pixel_values is None:
            return
        pix = batch.pixel_values
        sizes = self.image_sizes(batch, pix.shape[0])
        counts = [self.views_per_image(s) for s in sizes]
        # an image read by its base view alone (OneVision's multi-image prompts) keeps its crops' pixels
        extra = [i for i, c in enumerate(counts) if 1 < c < pix.shape[1] and bool(pix[i, c:].ne(0).any())]
        short = [i for i, c in enumerate(counts) if pix.dim() != 5 or c > pix.shape[1]]
        if extra or short:
            i = (short + extra)[0]
            given = "fewer" if i in short else "more"
            rows, cols = self.crop_grid(sizes[i])
            raise InputMismatchError(
                f"image {i} ({sizes[i][0]}x{sizes[i][1]} px): the processor gave {given} views than the model's "
                f"{counts[i]} (thumbnail + {rows}x{cols} crops of {m.view_size} px from image_grid_pinpoints "
                f"{m.pinpoints}); the processor and the model must share the pinpoints and the view size"
            )

    def crop_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(rows, cols)`` of AnyRes crops for an image of ``(height, width)`` pixels (the
        pinpoint transformers' ``select_best_resolution`` picks, read as (height, width))."""
        m = self.model
        h, w = select_best_resolution([int(image_size[0]), int(image_size[1])], m.pinpoints)
        return (h // m.view_size, w // m.view_size)

    def crop_region(self, image_size: tuple[int, int], grid: tuple[int, int] | None = None):
        """The unpadded region of the combined crop grid, as LLaVA-NeXT computes it.

        Returns ``(rows, cols, r0, height, c0, width)``: crop grid shape and the kept window
        ``[r0, r0+height) x [c0, c0+width)`` of the ``(rows*gh, cols*gw)`` token grid, where ``grid``
        ``(gh, gw)`` is the token grid of one crop (default: the tower's patch grid). A square
        ``grid`` is unpadded by transformers' ``unpad_image``, as the model does; a non-square one
        (a pooled grid such as 8 x 16) by the same rule applied to the crop's pixels, since
        ``unpad_image`` assumes square tokens and would trim the wrong window.
        """
        rows, cols = self.crop_grid(image_size)
        gh, gw = grid or self.model.grid
        return (rows, cols, *_unpadded_window(rows, cols, gh, gw, int(image_size[0]), int(image_size[1])))

    def image_token_count(self, image_size: tuple[int, int]) -> int:
        """Visual tokens of one image in the uncompressed prompt: the thumbnail's, then the unpadded
        crop grid's with a newline token closing each row."""
        n = self.model.patches_per_view
        _, _, _, height, _, width = self.crop_region(image_size)
        return n + height * (width + 1)

    def crop_valid(self, image_size: tuple[int, int]) -> torch.Tensor:
        """``(rows*cols, N)`` bool: crop patches that survive unpadding (crops in raster order)."""
        rows, cols, r0, height, c0, width = self.crop_region(image_size)
        gh, gw = self.model.grid
        r = torch.arange(rows * gh)[:, None]
        c = torch.arange(cols * gw)[None, :]
        inside = (r >= r0) & (r < r0 + height) & (c >= c0) & (c < c0 + width)
        return inside.view(rows, gh, cols, gw).permute(0, 2, 1, 3).reshape(rows * cols, gh * gw)

    def view_valid(self, image_size: tuple[int, int]) -> torch.Tensor:
        """``(views, N)`` bool: the thumbnail's every patch, then each crop's unpadded patches."""
        valid = torch.ones(self.views_per_image(image_size), self.model.patches_per_view, dtype=torch.bool)
        if valid.shape[0] > 1:
            valid[1:] = self.crop_valid(image_size)
        return valid

    def crop_window(self, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(r0, height, c0, width)``: the unpadded window of the combined crop grid."""
        return tuple(self.crop_region(image_size)[2:])

    def place_crops(self, out, proj, crop_rows: range, counts, size, crop_grid, engine) -> dict:
        """The crop tokens on the combined crop grid, newline tokens per the vision strategy's
        ``newline`` policy: a pooled grid is re-assembled and unpadded (`_crops_on_grid`), selected
        or merged tokens placed back in raster order (`_crops_placed`)."""
        newline = self.model.image_newline.to(proj.dtype)
        vision = engine.vision
        policy = getattr(vision, "newline", "keep") if vision else "keep"
        if out.grid is not None:
            return self._crops_on_grid(out, proj, crop_rows, size, crop_grid, newline, policy)
        vision = vision or engine.tower  # merged tokens of a tower strategy: its policies
        policy = getattr(vision, "newline", "keep") if vision else "keep"
        unpad = getattr(vision, "unpad", True)
        backend = engine.options.kernel_backend
        return self._crops_placed(out, proj, crop_rows, counts, size, newline, policy, unpad, backend)

    def _crops_on_grid(self, out, proj, crop_rows, size, crop_grid, newline, policy) -> dict:
        m = self.model
        gh, gw = out.grid
        rows, cols = crop_grid
        dev = proj.device
        crop_rows = slice(crop_rows.start, crop_rows.stop)
        f = proj[crop_rows, : gh * gw]
        d = f.shape[-1]
        f = f.view(rows, cols, gh, gw, d).permute(0, 2, 1, 3, 4).reshape(rows * gh, cols * gw, d)
        _, _, r0, height, c0, width = self.crop_region(size, (gh, gw))
        f = f[r0 : r0 + height, c0 : c0 + width]
        same = (gh, gw) == m.grid
        src = out.index[crop_rows, : gh * gw] if same else torch.full((rows * cols, gh * gw), -1, device=dev)
        src = (
            src.view(rows, cols, gh, gw)
            .permute(0, 2, 1, 3)
            .reshape(rows * gh, cols * gw)[r0 : r0 + height, c0 : c0 + width]
        )
        vid = torch.arange(1, rows * cols + 1, device=dev).view(rows, cols, 1, 1).expand(rows, cols, gh, gw)
        vid = vid.permute(0, 2, 1, 3).reshape(rows * gh, cols * gw)[r0 : r0 + height, c0 : c0 + width]
        f, src, vid = self._resample(f, src, vid, size)
        height, width = f.shape[:2]
        kind = torch.full((height, width), VISUAL, dtype=torch.int8, device=dev)
        offset = torch.arange(height * (width + 1), device=dev).view(height, width + 1)[:, :width]
        if not same:
            offset = torch.full_like(offset, -1)
        if policy != "drop":
            f = torch.cat([f, newline.expand(height, 1, d)], dim=1)
            src = torch.cat([src, src.new_full((height, 1), -1)], dim=1)
            vid = torch.cat([vid, vid.new_full((height, 1), -1)], dim=1)
            kind = torch.cat([kind, kind.new_full((height, 1), NEWLINE)], dim=1)
            nl_off = torch.arange(height, device=dev)[:, None] * (width + 1) + width
            offset = torch.cat([offset, nl_off if same else torch.full_like(nl_off, -1)], dim=1)
        return {
            "feats": f.reshape(-1, d),
            "kind": kind.flatten(),
            "patch": src.flatten(),
            "view": vid.flatten(),
            "offset": offset.flatten(),
        }

    def _resample(self, f: torch.Tensor, src: torch.Tensor, vid: torch.Tensor, size):
        """The unpadded crop grid ``(h, w, d)`` with its source patches and views ``(h, w)``, as the
        family feeds it to the LLM (LLaVA-NeXT: as it is; OneVision downsamples a large one)."""
        return f, src, vid

    def _crops_placed(self, out, proj, crop_rows: range, counts: list[int], size, newline, policy, unpad, be) -> dict:
        """Crop tokens with a source patch go back to the combined crop grid in raster order (inside
        the unpadded window when ``unpad``), each row closed by a newline per ``policy``; tokens with
        no source (index -1: CLS, merged) follow, ordered by (``group``, crop, their order).

        Returns every candidate, sorted so that the kept ones lead (grid tokens and newlines, then
        sourceless tokens), with ``kept`` their two counts on the device: the engine reads the counts
        of all images at once and trims (`Layout.trim`).
        """
        m = self.model
        gh, gw = m.grid
        rows, cols, r0, height, c0, width = self.crop_region(size)
        dev = proj.device
        k = out.index.shape[1]
        real = filled_slots(out.count[crop_rows.start : crop_rows.stop], k, sum(counts[r] for r in crop_rows))
        crop_id, slot = real // k, real % k  # every real token of the crops, crop by crop
        at = (crop_rows.start + crop_id, slot)
        idx = out.index[at]
        feats = kernels.gather_tokens(proj.flatten(0, 1)[None], (crop_rows.start * k + real)[None], backend=be)[0]
        group = out.group[at].long() if out.group is not None else torch.zeros_like(idx)
        placed = idx >= 0
        r = (crop_id // cols) * gh + idx // gw
        c = (crop_id % cols) * gw + idx % gw
        inside = (r >= r0) & (r < r0 + height) & (c >= c0) & (c < c0 + width)
        if unpad:
            ok = placed & inside
            top, left, n_rows, n_cols = r0, c0, height, width
        else:
            ok = placed
            top, left, n_rows, n_cols = 0, 0, rows * gh, cols * gw
        # grid tokens, then one newline candidate per row: sorted by raster key, the unkept last
        pr = torch.where(ok, r - top, n_rows)  # row n_rows: a spill row for the tokens not kept
        key = pr * (n_cols + 1) + (c - left)
        offset = torch.where(inside, (r - r0) * (width + 1) + (c - c0), -1)
        line = torch.arange(n_rows, device=dev)
        if policy == "keep":
            line_kept = torch.ones(n_rows, dtype=torch.bool, device=dev)
        elif policy == "rows":  # only rows that keep a token
            line_kept = torch.zeros(n_rows + 1, dtype=torch.bool, device=dev).scatter_(0, pr, True)[:n_rows]
        else:
            line_kept = torch.zeros(n_rows, dtype=torch.bool, device=dev)
        nl_abs = line + top
        nl_off = torch.where((nl_abs >= r0) & (nl_abs < r0 + height), (nl_abs - r0) * (width + 1) + width, -1)
        spill = (n_rows + 1) * (n_cols + 1)
        key = torch.cat([torch.where(ok, key, spill), torch.where(line_kept, line * (n_cols + 1) + n_cols, spill)])
        # sourceless tokens: by (group, crop, slot); the placed ones last
        extra_key = group * (len(crop_rows) + 1) * (k + 1) + crop_id * (k + 1) + slot
        extra_key = extra_key.masked_fill(placed, torch.iinfo(torch.long).max)
        order, extra = key.argsort(), extra_key.argsort()
        minus = idx.new_full((n_rows,), -1)
        kinds = torch.cat(
            [torch.full_like(idx, VISUAL, dtype=torch.int8), torch.full_like(line, NEWLINE, dtype=torch.int8)]
        )
        return {
            "feats": kernels.gather_tokens(
                torch.cat([feats, newline.expand(n_rows, -1)])[None], torch.cat([order, extra])[None], backend=be
            )[0],
            "kind": torch.cat([kinds[order], torch.full_like(extra, VISUAL, dtype=torch.int8)]),
            "patch": torch.cat([torch.cat([idx, minus])[order], idx[extra]]),
            "view": torch.cat([torch.cat([crop_id + 1, minus])[order], crop_id[extra] + 1]),
            "offset": torch.cat([torch.cat([offset, nl_off])[order], torch.full_like(extra, -1)]),
            # the kept ones lead each sorted part: trimmed after one read for all images (Layout.trim)
            "sorted": len(order),
            "kept": torch.stack([ok.sum() + line_kept.sum(), (~placed).sum()]),
        }


@lru_cache(maxsize=4096)
def _unpadded_window(rows: int, cols: int, gh: int, gw: int, orig_h: int, orig_w: int) -> tuple[int, int, int, int]:
    """``(r0, height, c0, width)`` kept of a ``rows x cols`` crop grid of ``gh x gw`` tokens each,
    for an ``orig_h x orig_w`` image (see `LlavaNextLayout.crop_region`)."""
    full_h, full_w = rows * gh, cols * gw
    if gh == gw:
        kept = unpad_image(torch.empty(1, full_h, full_w), (orig_h, orig_w)).shape[1:]
        # unpad_image keeps [pad, size - pad) on the trimmed axis (an extreme aspect ratio may keep none)
        return (full_h - kept[0]) // 2, kept[0], (full_w - kept[1]) // 2, kept[1]
    # unpad_image's rule on the padded canvas of square crops: the image, resized to fit, is
    # centred along the axis it does not fill; the content's length there, in this grid's tokens
    if orig_w / orig_h > cols / rows:  # wider than the canvas: rows are trimmed
        content = int(round(orig_h * cols * gh / orig_w, 7))
        pad = (full_h - content) // 2
        return pad, full_h - 2 * pad, 0, full_w
    content = int(round(orig_w * rows * gw / orig_h, 7))
    pad = (full_w - content) // 2
    return 0, full_h, pad, full_w - 2 * pad
