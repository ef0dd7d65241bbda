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
- Pivot order: the authors iterate a Python ``set`` (an order set by its hash table); here pivots
  are taken in sequence order, a documented and batch-independent stand-in.
- ``llm_positions="original"`` (default, the released code): kept tokens keep their position ids;
  ``"contiguous"`` renumbers them.
- ``similarity="final_norm"`` (default, the released code) or ``"hidden"``: the raw hidden states.

On LLaVA-NeXT the image span (newline tokens included) is one pool, as the authors' NeXT code
treats it; their NeXT default budget is 320.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import tokencomp as tc
from tokencomp.layout import repack
from tokencomp.strategy import TEXT, check_int, top_mask


@tc.register("dart")
class DART(tc.LayerStrategy):
    k: int = 2
    budget: int = 128
    pivot_image: int = 4
    pivot_text: int = 4
    count: str = "code"
    similarity: str = "final_norm"
    llm_positions: str = "original"

    def __post_init__(self) -> None:
        check_int("k (prune before layer)", self.k, 1)
        check_int("budget (image tokens kept)", self.budget, 1)
        check_int("pivot_image", self.pivot_image, 0, self.budget)
        check_int("pivot_text", self.pivot_text, 0)
        if self.pivot_image + self.pivot_text < 1:
            raise tc.BudgetError("DART needs at least one pivot (pivot_image + pivot_text >= 1)")
        for name, value, allowed in (
            ("count", self.count, ("code", "exact")),
            ("similarity", self.similarity, ("final_norm", "hidden")),
            ("llm_positions", self.llm_positions, ("original", "contiguous")),
        ):
            if value not in allowed:
                raise tc.TokencompError(f"{name} must be one of {allowed}, got {value!r}")

    @property
    def pivots(self) -> int:
        return self.pivot_image + self.pivot_text

    def check(self, info: tc.RunInfo) -> None:
        check_int("budget (image tokens kept)", self.budget, 1, min(info.visual_tokens or (0,)))

    def needs(self) -> list[tc.Need]:
        return [tc.Need("decoder_key_norm", self.k - 1)]

    def prune_layers(self, num_layers: int) -> list[int]:
        return [self.k]

    def keep(self, ctx: tc.LayerContext) -> torch.Tensor:
        img = ctx.image_mask
        b, n = img.shape
        pos = torch.arange(n, device=img.device)[None]
        last_image = torch.where(img, pos, -1).amax(1, keepdim=True)
        text_after = ctx.valid & (ctx.kind == TEXT) & (pos > last_image) & (last_image >= 0)

        # 1. pivots: the largest key L1 norms among the image tokens and the text after the image
        key_norm = ctx.key_norm(self.k - 1)
        image_pivots = top_mask(key_norm, img, self.pivot_image)
        pivot_index, pivot_ok = repack(image_pivots | top_mask(key_norm, text_after, self.pivot_text))

        # 2. cosine similarity of every token to each pivot, (B, P, n)
        h = ctx.final_norm(ctx.hidden) if self.similarity == "final_norm" else ctx.hidden
        h = F.normalize(h.float(), dim=-1)
        sim = torch.einsum("bpd,bnd->bpn", h[torch.arange(b, device=h.device)[:, None], pivot_index], h)

        # 3. each pivot in turn keeps the candidates least similar to it
        per_pivot = self.per_pivot(img.sum(1), image_pivots.sum(1), pivot_ok)
        keep = image_pivots
        pool = img & ~image_pivots
        for p in range(pivot_index.shape[1]):
            chosen = top_mask(-sim[:, p], pool, per_pivot[:, p])
            keep, pool = keep | chosen, pool & ~chosen
        return (ctx.valid & ~img) | keep

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
        """DART's own work per sample: the final norm (~4 FLOPs per element), the pivot-to-token
        cosine similarities (2 x pivots x n x d, n the tokens entering layer ``k``) and the keys'
        L1 norm with their RoPE (~4 FLOPs per key element; the keys themselves the layer computes)."""
        text = model.hf.config.text_config
        d = text.hidden_size
        head_dim = getattr(text, "head_dim", None) or d // text.num_attention_heads
        n = record.tokens_per_layer[sample][self.k - 1]
        return float(2 * self.pivots * n * d + 4 * n * d + 4 * n * text.num_key_value_heads * head_dim)
