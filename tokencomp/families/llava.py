"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one view per image, its patch tokens in raster
order. The base class of every family's layout."""

from __future__ import annotations

import torch

from ..errors import InputMismatchError
from ..strategy import VISUAL, ViewTokens


class Layout:
    """How a family lays out an image's views and places their tokens (LLaVA-1.5: one view).

    Args:
        model: the `tokencomp.Model` (its view size, patch grid, pinpoints and newline embedding).

    Attributes:
        family: the family's name in records (``"llava"``).
        has_crops: whether images have crop views besides the base view.
    """

    family = "llava"
    has_crops = False
    groups_images = False  # the processor takes images grouped by prompt (OneVision: several per prompt differ)

    def __init__(self, model) -> None:
        self.model = model

    # -- views of an image ----------------------------------------------------------------------
    def image_sizes(self, batch, n_images: int) -> list[tuple[int, int]]:
        """Each image's ``(height, width)`` as its views were cut (LLaVA-1.5: the view size)."""
        s = self.model.view_size
        return [(s, s)] * n_images

    def check_engine(self, engine) -> None:
        """Refuse, before any work, a composition of strategies the family cannot serve (none here)."""

    def check_views(self, batch) -> None:
        """Check the processor's views against the model's before any work (one view: nothing to check)."""

    def crop_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(rows, cols)`` of crops for an image of ``(height, width)`` pixels; ``(0, 0)`` without crops."""
        return (0, 0)

    def views_per_image(self, image_size: tuple[int, int]) -> int:
        """Views the vision tower encodes for one image (the base view, then its crops)."""
        rows, cols = self.crop_grid(image_size)
        return 1 + rows * cols

    def crop_region(self, image_size: tuple[int, int], grid: tuple[int, int] | None = None):
        """The unpadded region of the crop grid: families with crops only."""
        raise InputMismatchError(f"the {self.family} family has no crop grid")

    def image_token_count(self, image_size: tuple[int, int]) -> int:
        """Visual tokens of one image in the uncompressed prompt (newline tokens included)."""
        return self.model.patches_per_view

    def view_valid(self, image_size: tuple[int, int]) -> torch.Tensor:
        """``(views, N)`` bool: the patches of each view that reach the uncompressed prompt."""
        return torch.ones(self.views_per_image(image_size), self.model.patches_per_view, dtype=torch.bool)

    def crop_window(self, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(r0, height, c0, width)`` of the crop grid the uncompressed prompt keeps (no crops: zeros)."""
        return (0, 0, 0, 0)

    def view_share(self, image_size: tuple[int, int]) -> list[float]:
        """Per view, the share of its tokens the uncompressed prompt keeps after resampling (1.0
        each; OneVision's anyres_max resize makes it less): a vision strategy scales its per-view
        budget by it (`tokencomp.VisionView.share`)."""
        return [1.0] * self.views_per_image(image_size)

    # -- placing a strategy's tokens ------------------------------------------------------------
    def assemble(self, out: ViewTokens, proj: torch.Tensor, rows: range, counts: list[int], size, crop_grid, engine):
        """Lay out one image's tokens: its base view's kept tokens, then (`place_crops`) its crops'.

        Args:
            out: the vision strategy's output for every view of the batch.
            proj: ``(V, k, d)`` projected tokens of every view.
            rows: this image's views (consecutive, base view first).
            counts: tokens kept per view (all views').
            size: the image's ``(height, width)``; ``crop_grid`` its ``(rows, cols)``.
            engine: the `Engine` (its vision strategy's placement policies, its kernel backend).

        Returns:
            A dict of ``feats (m, d)``, ``kind``, ``patch``, ``view``, ``offset`` (position in the
            uncompressed image span, -1 unknown), ``num_views``,
            ``projected`` (tokens the projector ran on), and ``trim`` when crop tokens still wait
            for `trim`.
        """
        m = self.model
        dev = proj.device
        n = m.patches_per_view
        r0 = rows.start
        c0 = counts[r0]
        idx0 = out.index[r0, :c0]
        parts = {
            "feats": [proj[r0, :c0]],
            "kind": [torch.full((c0,), VISUAL, device=dev, dtype=torch.int8)],
            "patch": [idx0],
            "view": [torch.zeros_like(idx0)],
            "offset": [idx0 if out.grid in (None, m.grid) else torch.full_like(idx0, -1)],
        }
        crop = None
        if len(rows) > 1:
            crop = self.place_crops(out, proj, range(rows.start + 1, rows.stop), counts, size, crop_grid, engine)
            for name in parts:
                value = crop[name]
                if name == "offset":
                    value = torch.where(value >= 0, value + n, value)
                parts[name].append(value)
        tok = {name: torch.cat(v) for name, v in parts.items()}
        if crop is not None and "kept" in crop:
            tok["trim"] = (c0, crop["sorted"], crop["kept"])
        tok["num_views"] = len(rows)
        tok["projected"] = sum(counts[r] for r in rows)  # tokens the projector ran on, before unpadding drops any
        return tok

    def place_crops(self, out, proj, crop_rows: range, counts, size, crop_grid, engine) -> dict:
        """An image's crop tokens, placed (families with crops)."""
        raise InputMismatchError(f"the {self.family} family has no crop views, but an image has {len(crop_rows) + 1}")

    @staticmethod
    def trim(tok: dict, main: int, extra: int) -> None:
        """Keep an image's base-view tokens, the first ``main`` of its sorted crop candidates and
        the first ``extra`` of its sorted sourceless crop tokens (`LlavaNextLayout.place_crops`)."""
        base, sorted_len, _ = tok.pop("trim")
        cut = base + sorted_len
        for name in ("feats", "kind", "patch", "view", "offset"):
            t = tok[name]
            tok[name] = torch.cat([t[: base + main], t[cut : cut + extra]])
