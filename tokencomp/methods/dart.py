"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", arXiv 2502.11494).

Before decoder layer ``k`` (default 2) DART keeps the image tokens that *duplicate* least:

1. **Pivot tokens**: the ``pivot_image`` image tokens and the ``pivot_text`` text tokens (of the
   text after the image) whose keys at layer ``k - 1`` have the largest L1 norm (the released
   code: post-RoPE keys of every head, concatenated).
2. **Duplication**: hidden states entering layer ``k``, through the decoder's final norm (as the
   released code does), compared by cosine similarity.
3. For each pivot in turn, the ``per_pivot`` image tokens *least* similar to it are kept and leave
   the candidate pool. Image pivots are kept; text pivots only serve as references.

Where the released code and the paper's wording differ, the choice is an option:

- ``count="code"`` (default, the released code): ``per_pivot = budget // (pivot_image +
  pivot_text)``, at most ``(image tokens - pivot_image) // pivots``; the image pivots come on top,
  so ``budget=128`` keeps 132 tokens (4 + 8 x 16), and the published "128 tokens" runs did too.
  ``"exact"``: exactly ``budget`` tokens, the image pivots included, the rest split as evenly as
  possible over the pivots (the first ones take one more).
- ``pivot_order="set"`` (default, the released code): the authors loop over
  ``list(set(image_pivots + text_pivots))``, each list by descending key norm, holding the tokens'
  indices in the sequence (the prompt, when no vision-stage method ran before; after one, the
  compressed sequence, as the authors' LLM would see it); CPython orders a set of ints by their values (hash = value) and insertion
  order, so the same indices give the same order here. ``"sequence"``: pivots in prompt order.
  Order matters: a pivot picks from what the earlier ones left (and, with ``count="exact"``, the
  first pivots take the remainder).
- ``llm_positions="original"`` (default, the released code): kept tokens keep their position ids
  (unless `EngineOptions.llm_positions` renumbers every pruning); ``"contiguous"`` renumbers them.
- ``similarity="final_norm"`` (default, the released code) or ``"hidden"``: the raw hidden states.

On LLaVA-NeXT the image span (newline tokens included) is one pool, as the authors' NeXT code
treats it; their NeXT default budget is 320. Several images in one sample form one pool too, with
the text pivots drawn from the text after the last image. A sample with fewer text tokens after
the image than ``pivot_text`` has fewer pivots (the authors' code would fail); in code mode the
missing pivots keep nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import tokencomp as tc
from tokencomp import kernels
from tokencomp.layout import repack
from tokencomp.strategy import check_image_budget, check_int, top_mask


@tc.register("dart")
class DART(tc.LayerStrategy):
    """DART (arXiv 2502.11494): before decoder layer ``k``, keep the image tokens least similar
    to a few pivot tokens (duplication, not importance); ``budget`` image tokens (see ``count``)."""

    k: int = 2
    budget: int = 128
    pivot_image: int = 4
    pivot_text: int = 4
    count: str = "code"
    similarity: str = "final_norm"
    pivot_order: str = "set"
    llm_positions: str = "original"

    def __post_init__(self) -> None:
        check_int("k (prune before layer)", self.k, 1)
        check_int("budget (image tokens kept)", self.budget, 1)
        check_int("pivot_image (image pivots, kept)", self.pivot_image, 1, self.budget)
        check_int("pivot_text", self.pivot_text, 0)
        for name, value, allowed in (
            ("count", self.count, ("code", "exact")),
            ("similarity", self.similarity, ("final_norm", "hidden")),
            ("pivot_order", self.pivot_order, ("set", "sequence")),
            ("llm_positions", self.llm_positions, ("original", "contiguous")),
        ):
            if value not in allowed:
                raise tc.TokencompError(f"{name} must be one of {allowed}, got {value!r}")

    @property
    def pivots(self) -> int:
        return self.pivot_image + self.pivot_text

    def check(self, info: tc.RunInfo) -> None:
        check_image_budget(self.budget, info)

    def needs(self) -> list[tc.Need]:
        return [tc.Need("decoder_key_norm", self.k - 1)]

    def prune_layers(self, num_layers: int) -> list[int]:
        return [self.k]

    def keep(self, ctx: tc.LayerContext) -> torch.Tensor:
        img = ctx.image_mask

        # 1. pivots: the largest key L1 norms among the image tokens and the text after the image
        key_norm = ctx.key_norm(self.k - 1)
        image_pivots = top_mask(key_norm, img, self.pivot_image)
        text_pivots = top_mask(key_norm, ctx.text_after_image, self.pivot_text)
        if self.pivot_order == "sequence":
            pivot_index, pivot_ok = repack(image_pivots | text_pivots)
        else:
            pivot_index, pivot_ok = self.set_order(ctx, key_norm, image_pivots, text_pivots)

        # 2. cosine similarity of every token to each pivot, (B, P, n)
        h = ctx.final_norm(ctx.hidden) if self.similarity == "final_norm" else ctx.hidden
        h = F.normalize(h.float(), dim=-1)
        sim = torch.einsum("bpd,bnd->bpn", kernels.gather_tokens(h, pivot_index, backend=ctx.backend), h)

        # 3. each pivot in turn keeps the candidates least similar to it
        per_pivot = self.per_pivot(img.sum(1), image_pivots.sum(1), pivot_ok)
        keep = image_pivots
        pool = img & ~image_pivots
        for p in range(pivot_index.shape[1]):
            chosen = top_mask(-sim[:, p], pool, per_pivot[:, p])
            keep, pool = keep | chosen, pool & ~chosen
        return (ctx.valid & ~img) | keep

    @staticmethod
    def set_order(ctx: tc.LayerContext, key_norm, image_pivots, text_pivots) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, P)`` pivot columns and their validity, each sample's in the order of the authors'
        ``list(set(image + text))`` over the tokens' indices in the sequence entering layer ``k``
        (the prompt index when nothing before DART compressed; unique even for pooled or merged
        tokens, which have no prompt index), each part listed by descending key norm (one host sync)."""
        row_index = ctx.valid.long().cumsum(1) - 1  # left padding: the index within the unpadded row
        norm, orig = key_norm.float().cpu(), row_index.cpu()
        image_pivots, text_pivots = image_pivots.cpu(), text_pivots.cpu()
        columns = []
        for i in range(norm.shape[0]):
            listed = [
                c
                for mask in (image_pivots, text_pivots)
                for c in sorted(mask[i].nonzero().flatten().tolist(), key=lambda c: -norm[i, c])
            ]
            prompt_index = [int(orig[i, c]) for c in listed]
            column_of = dict(zip(prompt_index, listed))
            # the released code's list(set(...)): a set built from the list, listed as it stands
            # (a copy of it would rebuild the hash table and can list colliding entries otherwise)
            columns.append([column_of[j] for j in list(set(prompt_index))])
        width = max(map(len, columns), default=0)
        index = torch.tensor([c + [0] * (width - len(c)) for c in columns], dtype=torch.long).view(len(columns), width)
        valid = torch.arange(width)[None] < torch.tensor([len(c) for c in columns])[:, None]
        return index.to(key_norm.device), valid.to(key_norm.device)

    def per_pivot(self, image_count: torch.Tensor, image_pivots: torch.Tensor, pivot_ok: torch.Tensor) -> torch.Tensor:
        """``(B, P)`` long: tokens each pivot keeps, from ``(B,)`` image-token and image-pivot counts
        and the ``(B, P)`` mask of real pivots (a sample may have fewer text tokens than pivots)."""
        if self.count == "code":
            each = torch.minimum(image_count.new_tensor(self.budget), image_count - self.pivot_image)
            each = each.clamp(min=0) // self.pivots
            return each[:, None] * pivot_ok
        rest = (torch.minimum(image_count, image_count.new_tensor(self.budget)) - image_pivots).clamp(min=0)
        real = pivot_ok.sum(1).clamp(min=1)
        extra = (pivot_ok.long().cumsum(1) - 1 < (rest % real)[:, None]).long()
        return ((rest // real)[:, None] + extra) * pivot_ok

    def overhead_flops(self, model, record, sample: int) -> float:
        """DART's own matrix products per sample (the profiler's convention: element-wise work such
        as the norms is not counted): the pivot-to-token cosine similarities, 2 x pivots x n x d
        FLOPs with n the tokens entering layer ``k`` (the keys themselves the layer computes)."""
        n = record.tokens_per_layer[sample][self.k - 1]
        return float(2 * self.pivots * n * model.hf.config.text_config.hidden_size)
