"""Independent references built only from the unmodified Hugging Face modules."""

from __future__ import annotations

import torch


def causal_mask(n: int, dtype=torch.float32) -> torch.Tensor:
    m = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return m[None, None]


def run_layers(hf, hidden, positions, layers, frozen_visual=None):
    """Run decoder ``layers`` (indices) of ``hf`` on ``hidden (1, n, d)`` with explicit positions.

    ``frozen_visual``: ``{layer: (n,) bool}`` tokens whose hidden states pass through that layer.
    """
    lm = hf.model.language_model
    cos_sin = lm.rotary_emb(hidden, positions)
    mask = causal_mask(hidden.shape[1], hidden.dtype)
    for i in layers:
        out = lm.layers[i](hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=positions)
        if frozen_visual and i in frozen_visual:
            out = torch.where(frozen_visual[i][None, :, None], hidden, out)
        hidden = out
    return hidden


def layer_qk(hf, index: int, hidden, positions):
    """Layer ``index``'s own queries and keys ``(1, H, n, d_head)`` (RoPE applied, keys repeated
    to every query head) from its ``input_layernorm`` of ``hidden`` ``(1, n, d)``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    lm = hf.model.language_model
    attn = lm.layers[index].self_attn
    x = lm.layers[index].input_layernorm(hidden)
    hd = attn.head_dim
    q = attn.q_proj(x).view(1, x.shape[1], -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, x.shape[1], -1, hd).transpose(1, 2)
    cos, sin = lm.rotary_emb(hidden, positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, repeat_kv(k, q.shape[1] // k.shape[1])


def logits_last(hf, hidden):
    lm = hf.model.language_model
    return hf.lm_head(lm.norm(hidden[:, -1])).float()


def embeds(hf, batch_one: dict) -> torch.Tensor:
    """Input embeddings (1, T, d) with image features scattered in, via the HF model's own code."""
    with torch.no_grad():
        out = hf(**batch_one, output_hidden_states=True)
    return out.hidden_states[0]


def run_pruned(hf, out, kept: torch.Tensor, k: int, steps: int):
    """Layers ``k..L-1`` on the prompt tokens ``kept`` (original position ids) of the full forward
    ``out`` (with hidden states), then ``steps - 1`` greedy steps, each recomputed without a cache
    with the kept set fixed from the prefill. Returns (prefill last logits, greedy tokens)."""
    lm = hf.model.language_model
    L = len(lm.layers)
    n = out.hidden_states[0].shape[1]
    h = run_layers(hf, out.hidden_states[k][:, kept], kept[None], range(k, L))
    first = logits_last(hf, h)
    x0 = out.hidden_states[0]
    tokens = [int(first.argmax(-1))]
    for _ in range(steps - 1):
        x = torch.cat([x0, lm.embed_tokens(torch.tensor([tokens]))], dim=1)
        m = x.shape[1]
        x = run_layers(hf, x, torch.arange(m)[None], range(k))
        sel = torch.cat([kept, torch.arange(n, m)])
        x = run_layers(hf, x[:, sel], sel[None], range(k, L))
        tokens.append(int(logits_last(hf, x).argmax(-1)))
    return first, tokens


def fastv_reference(
    hf, inputs: dict, image_token_id: int, k: int, ratio: float, steps: int, query: str = "last", rounding="round"
):
    """FastV on one unpadded sample, from eager attentions and an explicitly shortened sequence.
    Image tokens are ranked by the head-mean attention of layer ``k - 1`` from the last token
    (``query="last"``), averaged over the text tokens' rows (``"text"``) or over every row (``"all"``).
    The kept count: the authors' ``round(N * (1 - R))`` (their HF integration), or ``int(...)``
    with ``rounding="floor"`` (their lmms-eval script).

    Returns (kept original indices, prefill last logits, greedy tokens by no-cache recomputation).
    """
    with torch.no_grad():
        out = hf(**inputs, output_hidden_states=True, output_attentions=True)
        ids = inputs["input_ids"][0]
        n = ids.shape[0]
        img = (ids == image_token_id).nonzero().flatten()
        att = out.attentions[k - 1][0].mean(0)  # (n, n) head mean
        rows = {"last": att[-1:], "text": att[ids != image_token_id], "all": att}[query]
        score = rows.mean(0)[img]
        n_keep = (round if rounding == "round" else int)(len(img) * (1 - ratio))
        top = img[score.argsort(descending=True, stable=True)[:n_keep]]
        keep = torch.ones(n, dtype=torch.bool)
        keep[img] = False
        keep[top] = True
        kept = keep.nonzero().flatten()
        first, tokens = run_pruned(hf, out, kept, k, steps)
    return kept, first, tokens


def pdrop_reference(hf, inputs: dict, image_token_id: int, boundaries, ratio: float, steps: int):
    """PyramidDrop on one unpadded sample as its authors' code does it: at each boundary ``b`` the
    hidden states leaving layer ``b - 1`` go through layer ``b``'s own ``input_layernorm``, q and k
    projections and RoPE; the head-mean softmax row of the last token ranks the image tokens, the
    top ``int(ratio * remaining)`` are kept and every kept token is renumbered 0..k-1.

    Returns (kept original indices after the last stage, prefill last logits, greedy tokens by
    no-cache recomputation with each stage's kept set fixed from the prefill).
    """
    lm = hf.model.language_model
    L = len(lm.layers)
    with torch.no_grad():
        ids = inputs["input_ids"][0]
        h = hf(**inputs, output_hidden_states=True).hidden_states[0]
        x0 = h
        kept = torch.arange(len(ids))
        stages = [(0, kept)]  # (first layer, prompt tokens it runs on)
        for b in boundaries:
            start = stages[-1][0]
            pos = torch.arange(len(kept))[None]
            h = run_layers(hf, h, pos, range(start, b))
            q, k = layer_qk(hf, b, h, pos)
            row = ((q[:, :, -1:] @ k.transpose(-1, -2)) * lm.layers[b].self_attn.scaling).softmax(-1)[0, :, 0].mean(0)
            img = (ids[kept] == image_token_id).nonzero().flatten()
            top = img[row[img].argsort(descending=True, stable=True)[: int(len(img) * ratio)]]
            keep = ids[kept] != image_token_id
            keep[top] = True
            kept, h = kept[keep], h[:, keep]
            stages.append((b, kept))
        first = logits_last(hf, run_layers(hf, h, torch.arange(len(kept))[None], range(stages[-1][0], L)))
        tokens = [int(first.argmax(-1))]
        emb = lm.embed_tokens
        for _ in range(steps - 1):
            x = torch.cat([x0, emb(torch.tensor([tokens]))], dim=1)
            for s, (start, sel) in enumerate(stages):
                end = stages[s + 1][0] if s + 1 < len(stages) else L
                if s:  # the stage's kept prompt tokens, then the decoded ones; renumbered
                    prev = stages[s - 1][1]
                    x = x[:, torch.cat([torch.searchsorted(prev, sel), torch.arange(len(prev), x.shape[1])])]
                x = run_layers(hf, x, torch.arange(x.shape[1])[None], range(start, end))
            tokens.append(int(logits_last(hf, x).argmax(-1)))
    return kept, first, tokens


def dart_reference(
    hf, inputs: dict, image_token_id: int, k: int, budget: int, pivots: tuple[int, int], steps: int, exact: bool
):
    """DART on one unpadded sample, written after the authors' set-based loop: pivots by the L1
    norm of layer ``k - 1``'s post-RoPE keys (read from the HF model's own KV cache), duplication
    by cosine similarity of the final-normed hidden states entering layer ``k``; the pivots visited
    in the order of ``list(set(image_pivots + text_pivots))`` over prompt indices, as the authors'
    loop does. ``exact``: keep exactly ``budget`` (else the authors' per-pivot floor).

    Returns (kept original indices, prefill last logits, greedy tokens).
    """
    lm = hf.model.language_model
    pivot_image, pivot_text = pivots
    with torch.no_grad():
        out = hf(**inputs, output_hidden_states=True, use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        ids = inputs["input_ids"][0]
        n = len(ids)
        norm = cache.layers[k - 1].keys[0].abs().sum((0, 2))  # (n,): every key/value head
        img = (ids == image_token_id).nonzero().flatten().tolist()
        text = list(range(img[-1] + 1, n))

        def top(cands, count):
            order = norm[cands].argsort(descending=True, stable=True)[:count]
            return [cands[i] for i in order.tolist()]

        image_pivots, text_pivots = top(img, pivot_image), top(text, pivot_text)
        indices_set = set(image_pivots + text_pivots)
        visit = list(indices_set)  # the released loop: `for item in list(indices_set)`
        P = pivot_image + pivot_text
        if exact:
            rest = min(budget, len(img)) - len(image_pivots)
            take = [rest // len(visit) + (i < rest % len(visit)) for i in range(len(visit))]
        else:
            take = [min(budget, len(img) - pivot_image) // P] * len(visit)
        state = lm.norm(out.hidden_states[k])[0]
        kept, pool = set(image_pivots), set(img) - set(image_pivots)
        for piv, count in zip(visit, take):
            cands = sorted(pool)
            sim = torch.nn.functional.cosine_similarity(state[piv][None], state[cands], dim=-1)
            chosen = [cands[i] for i in sim.argsort(stable=True)[:count].tolist()]
            kept |= set(chosen)
            pool -= set(chosen)
        keep = torch.tensor(sorted(set(range(n)) - set(img) | kept))
        first, tokens = run_pruned(hf, out, keep, k, steps)
    return keep, first, tokens


def sparsevlm_reference(hf, inputs: dict, image_token_id: int, layers, counts, steps: int, recycling: bool = True):
    """SparseVLM on one unpadded sample, written after the authors' loop (``LlamaDynamicvitModel``):
    raters from the input embeddings; at each sparse layer its own causal softmax map (from its
    norm, q/k projections and RoPE), head-mean, rater rows, image columns ranks the image tokens;
    the top ``min(k, v - 1)`` stay in the layer's output, the top 30% + 1 of the deleted ones by
    that score are merged by DPC-KNN into ``int(num / 10) + 1`` tokens placed after them;
    positions renumbered. Returns (prefill last logits, greedy tokens, image tokens per stage).
    """
    lm = hf.model.language_model
    L = len(lm.layers)
    with torch.no_grad():
        out = hf(**inputs, output_hidden_states=True)
        ids = inputs["input_ids"][0]
        n = len(ids)
        x0 = out.hidden_states[0]
        img = (ids == image_token_id).nonzero().flatten()
        v_start, v_num = int(img[0]), len(img)
        text_start = v_start + v_num
        v_t, t_t = x0[0, v_start:text_start].float(), x0[0, text_start:].float()
        m_v_t = (v_t @ t_t.T).softmax(1).mean(0)
        t_idx = torch.where(m_v_t > m_v_t.mean())[0]
        h, prev, stages, per_stage = x0, 0, [], []
        for stage, lay in enumerate(layers):
            pos = torch.arange(h.shape[1])[None]
            h = run_layers(hf, h, pos, range(prev, lay))
            q, k = layer_qk(hf, lay, h, pos)
            probs = ((q @ k.transpose(-1, -2)) * lm.layers[lay].self_attn.scaling + causal_mask(h.shape[1])).softmax(-1)
            relation = probs.mean(1)[0][t_idx + text_start][:, v_start:text_start].mean(0)
            h = run_layers(hf, h, pos, [lay])
            top = relation.argsort(descending=True, stable=True)[: min(counts[stage], v_num - 1)]
            pred = torch.zeros(v_num, dtype=torch.bool)
            pred[top] = True
            kept = h[:, v_start + pred.nonzero().flatten()]
            deleted = (~pred).nonzero().flatten()
            merged = h[:, :0]
            if recycling and len(deleted):
                num = int(len(deleted) * 0.3) + 1
                order = relation[deleted].argsort(descending=True, stable=True)[:num]
                merged = _cluster_and_merge(h[0, v_start + deleted[order]], int(num / 10) + 1)[None]
            h = torch.cat([h[:, :v_start], kept, merged.to(h.dtype), h[:, text_start:]], dim=1)
            v_num = kept.shape[1] + merged.shape[1]
            text_start = v_start + v_num
            prev = lay + 1
            stages.append((lay + 1, h.clone()))
            per_stage.append(v_num)
        first = logits_last(hf, run_layers(hf, h, torch.arange(h.shape[1])[None], range(prev, L)))
        tokens = [int(first.argmax(-1))]
        for _ in range(steps - 1):
            x = torch.cat([x0, lm.embed_tokens(torch.tensor([tokens]))], dim=1)
            start, prompt = 0, n
            for begin, state in stages:  # each stage's prompt from the prefill, decoded rows renumbered after it
                x = run_layers(hf, x, torch.arange(x.shape[1])[None], range(start, begin))
                x = torch.cat([state, x[:, prompt:]], dim=1)
                start, prompt = begin, state.shape[1]
            x = run_layers(hf, x, torch.arange(x.shape[1])[None], range(start, L))
            tokens.append(int(logits_last(hf, x).argmax(-1)))
    return first, tokens, per_stage


def _cluster_and_merge(x: torch.Tensor, cluster_num: int) -> torch.Tensor:
    """The authors' DPC-KNN merge of ``x`` ``(N, C)`` (their ``cluster_and_merge``), with a stable
    sort for the centres in place of their 1e-6 density noise."""
    x = x.float()
    N, C = x.shape
    dist_matrix = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2) / C**0.5
    dist_nearest = dist_matrix.topk(cluster_num, dim=-1, largest=False).values
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    mask = (density[None, :] > density[:, None]).float()
    dist_max = dist_matrix.max()
    dist = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1).values
    index_down = (dist * density).argsort(descending=True, stable=True)[:cluster_num]
    idx_cluster = dist_matrix[index_down].argmin(dim=0)
    idx_cluster[index_down] = torch.arange(cluster_num)
    all_weight = torch.zeros(cluster_num).index_add_(0, idx_cluster, torch.ones(N)) + 1e-6
    return torch.zeros(cluster_num, C).index_add_(0, idx_cluster, x / all_weight[idx_cluster][:, None])


def divprune_reference(hf, inputs: dict, image_token_id: int, steps: int, budget=None, ratio=None):
    """DivPrune on one unpadded sample, as its authors' loop does it on the input embeddings the
    HF model builds (the image span: every image-token position, NeXT newlines included): the
    cosine-distance matrix, the first pick by the largest second-smallest column entry, then the
    chosen rows' column minima; the kept sequence runs through every layer with positions
    0..k-1 (no cache: each greedy step recomputes the whole shortened prompt).

    Returns (kept original indices, prefill last logits, greedy tokens)."""
    with torch.no_grad():
        out = hf(**inputs, output_hidden_states=True)
        x0 = out.hidden_states[0]
        ids = inputs["input_ids"][0]
        img = (ids == image_token_id).nonzero().flatten()
        v = x0[0, img]
        n = len(img)
        terms = int(round(ratio * n)) if ratio is not None else min(budget, n)
        unit = v / v.norm(dim=1, keepdim=True)
        dist = 1.0 - torch.mm(unit, unit.t())
        chosen = []
        for i in range(terms):
            if i == 0:
                scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
            else:
                scores = torch.min(dist[torch.tensor(chosen)], dim=0).values
            chosen.append(int(torch.argmax(scores)))
        keep = torch.ones(len(ids), dtype=torch.bool)
        keep[img] = False
        keep[img[torch.tensor(chosen, dtype=torch.long)]] = True
        kept = keep.nonzero().flatten()
    first, tokens = greedy_from_embeds(hf, x0[:, kept], steps)
    return kept, first, tokens


def greedy_from_embeds(hf, x: torch.Tensor, steps: int):
    """A fresh HF decoder on the input embeddings ``x (1, n, d)`` with positions 0..n-1, then
    ``steps - 1`` greedy steps, each recomputed on the whole sequence without a cache.
    Returns (first logits, greedy tokens)."""
    lm = hf.model.language_model
    first, tokens = None, []
    with torch.no_grad():
        for _ in range(steps):
            logits = logits_last(hf, run_layers(hf, x, torch.arange(x.shape[1])[None], range(len(lm.layers))))
            first = logits if first is None else first
            tokens.append(int(logits.argmax(-1)))
            x = torch.cat([x, lm.embed_tokens(torch.tensor([tokens[-1:]]))], dim=1)
    return first, tokens


def image_span_replaced(hf, input_ids: torch.Tensor, image_token_id: int, tokens: torch.Tensor) -> torch.Tensor:
    """``(1, n', d)``: the text embeddings of one prompt (1-D ``input_ids``) with its image span
    replaced by ``tokens (m, d)``."""
    embed = hf.model.language_model.embed_tokens
    img = (input_ids == image_token_id).nonzero().flatten()
    with torch.no_grad():
        return torch.cat([embed(input_ids[: img[0]]), tokens, embed(input_ids[img[-1] + 1 :])])[None]
