"""Eager references for vision-stage methods: everything from `output_attentions` / hidden states
of the unmodified Hugging Face vision tower, written from the specification (METHODS.md)."""

from __future__ import annotations

import torch


def tower_views(model, batch):
    """Pixel views in engine order (LLaVA-NeXT: the real views of each image)."""
    pix = batch.pixel_values
    if pix.dim() == 5:
        pix = torch.cat([pix[i, : model.views_per_image(tuple(s))] for i, s in enumerate(batch.image_sizes.tolist())])
    return pix


def eager_tower(hf_eager, pix, layer: int):
    """(hidden at the projector's input layer (V, 1+N, d), eager attention (V, H, 1+N, 1+N) and
    head-mean keys (V, 1+N, d_head) of encoder ``layer``)."""
    tower = hf_eager.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    layers = vm.encoder.layers
    with torch.no_grad():
        out = tower(pix, output_hidden_states=True, output_attentions=True)
        lay = layers[layer]
        x = lay.layer_norm1(out.hidden_states[layer % len(layers)])
        k = lay.self_attn.k_proj(x)
        heads = lay.self_attn.num_heads
        keys = k.view(k.shape[0], k.shape[1], heads, -1).mean(2)
    return out.hidden_states[hf_eager.config.vision_feature_layer], out.attentions[layer], keys


def visionzip_view(hidden, attn, keys, dominant: int, contextual: int, merge: str = "code", cls: bool = True):
    """One view: returns (tokens (dominant+contextual, d), kept patch indices (0-based, raster)).
    ``cls=False`` (SigLIP): score = attention received, averaged over query rows, summed over heads."""
    n1 = hidden.shape[0]
    if not cls:
        received = attn.mean(1).sum(0)  # (N,)
        keep = sorted(received.topk(dominant).indices.tolist())
        out, kept = [hidden[i] for i in keep], keep
    else:
        cls_att = attn.sum(0)[0, 1:]
        top = (cls_att.topk(dominant - 1).indices + 1).tolist()
        keep = sorted([0, *top])
        out, kept = [hidden[i] for i in keep], [i - 1 for i in keep[1:]]
    rest = [i for i in range(n1) if i not in keep]
    if contextual:
        m = keys[rest]
        m = m / m.norm(dim=-1, keepdim=True)
        step = max(1, len(rest) // contextual)
        targets = list(range(0, len(rest), step))[:contextual]
        others = [i for i in range(len(rest)) if i not in targets]
        assign = (m[others] @ m[targets].T).argmax(-1).tolist()
        for j, t in enumerate(targets):
            members = [rest[others[i]] for i, a in enumerate(assign) if a == j]
            if merge == "code":
                extra = torch.stack([hidden[i] for i in members]).mean(0) if members else 0
                out.append(hidden[rest[t]] + extra)
            else:
                out.append(torch.stack([hidden[i] for i in [rest[t], *members]]).mean(0))
    return torch.stack(out), kept


def prumerge_view(x, q_cls, keys, k_neighbours=32, plus=False, neighbours="all", extra=True, order="score"):
    """One view of LLaVA-PruMerge(+) as the released code does it (loops, numpy quartiles).

    x: (N, d) features; q_cls: (D,) raw CLS query; keys: (1+N, D) raw keys. Returns (tokens, indices).
    """
    import numpy as np

    n = x.shape[0]
    a = torch.softmax((q_cls.float() @ keys.float().T) * keys.shape[-1] ** -0.5, dim=-1)[1:]
    arr = a.numpy()
    q1, q3 = np.percentile(arr, 25), np.percentile(arr, 75)
    k = int((arr > q3 + 1.5 * (q3 - q1)).sum())
    keep = [int(i) for i in np.argsort(-arr, kind="stable")[:k]]
    if plus and k > 0:
        stride = max(1, int(int(1 / (k / n)) / 3))
        keep += [i for i in range(0, n - 1, stride) if i not in keep]
    if order == "raster":
        keep = sorted(keep)
    kn = torch.nn.functional.normalize(keys[1:].float(), dim=-1)
    out = []
    for i in keep:
        cand = [j for j in range(n) if j != i and (neighbours == "all" or j not in keep)]
        sims = torch.stack([kn[i] @ kn[j] for j in cand])
        nn = [cand[t] for t in sims.topk(min(k_neighbours, len(cand))).indices.tolist()]
        out.append(x[i] + sum(a[j] * x[j] for j in nn))
    if extra:
        out.append(sum(a[j] * x[j] for j in range(n) if j not in keep))
    return torch.stack(out), keep


def _scaled_qk(hf_eager, pix, layer: int):
    """Encoder ``layer``'s scaled queries and keys ``(V, T, H, d_head)`` from its own projections of
    its normed input, and the tower's hidden states."""
    tower = hf_eager.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    lay = vm.encoder.layers[layer]
    with torch.no_grad():
        hs = tower(pix, output_hidden_states=True).hidden_states
        x = lay.layer_norm1(hs[layer % len(vm.encoder.layers)])
        att = lay.self_attn
        q = (att.q_proj(x) * att.scale).view(x.shape[0], x.shape[1], att.num_heads, -1)
        k = att.k_proj(x).view(x.shape[0], x.shape[1], att.num_heads, -1)
    return q, k, hs


def cls_logits_head_mean(hf_eager, pix, layer: int = -1):
    """(V, N) head-mean pre-softmax scaled CLS logits of encoder ``layer``, from its projections."""
    q, k, hs = _scaled_qk(hf_eager, pix, layer)
    logits = torch.einsum("vhd,vnhd->vhn", q[:, 0], k)
    return logits.mean(1)[:, 1:], hs[hf_eager.config.vision_feature_layer][:, 1:]


def mean_logits_head_mean(hf_eager, pix, layer: int = -1):
    """(V, N) pre-softmax scaled logits each token receives at encoder ``layer``, averaged over every
    query row and head (towers without CLS), from the full (V, H, N, N) logits of its projections;
    and the features at the projector's input layer."""
    q, k, hs = _scaled_qk(hf_eager, pix, layer)
    logits = torch.einsum("vqhd,vnhd->vhqn", q, k)
    return logits.mean(2).mean(1), hs[hf_eager.config.vision_feature_layer]


def globalcom2_image(scores, grid, crops, valid, ratio=0.25, tau=10.0, share=1.0):
    """Kept indices per view of one LLaVA-NeXT image, written from METHODS.md §2 with loops.

    scores: (1 + C, N) thumbnail first; valid: (C, N) unpadded mask; share: the crops' share of
    their tokens after LLaVA-OneVision's anyres_max resize (a crop keeps int(N_j * share * r_j)).
    Returns list of index lists (thumbnail in descending score, crops in raster order).
    """
    import math

    h, w = grid
    rows, cols = crops
    n = h * w
    thumb = scores[0]
    out = [thumb.argsort(descending=True)[: int(n * ratio)].tolist()]
    ph, pw = max(h // rows, 1), max(w // cols, 1)
    s = [0.0] * (rows * cols)
    for idx in range(n):
        i, j = divmod(idx, w)
        s[min(i // ph, rows - 1) * cols + min(j // pw, cols - 1)] += float(thumb[idx])
    ex = [math.exp((v - max(s)) / tau) for v in s]
    sigma = [e / (sum(ex) + 1e-8) for e in ex]
    r = [min(ratio * (1 + sg - sum(sigma) / len(sigma)), 1.0) for sg in sigma]
    # unpadded window of the combined grid
    full = torch.zeros(rows * h, cols * w, dtype=torch.bool)
    for c in range(rows * cols):
        full[(c // cols) * h : (c // cols + 1) * h, (c % cols) * w : (c % cols + 1) * w] = valid[c].view(h, w)
    rr = [i for i in range(rows * h) if full[i].any()]
    cc = [j for j in range(cols * w) if full[:, j].any()]
    glob = torch.nn.functional.interpolate(
        thumb.view(1, 1, h, w), size=(len(rr), len(cc)), mode="bilinear", align_corners=False
    )[0, 0]
    for c in range(rows * cols):
        idx = [p for p in range(n) if valid[c, p]]
        if not idx:  # a crop of padding only
            out.append([])
            continue
        loc = torch.stack([scores[1 + c, p] for p in idx])
        gl = torch.stack([glob[(c // cols) * h + p // w - rr[0], (c % cols) * w + p % w - cc[0]] for p in idx])
        comb = loc / loc.norm() + gl / gl.norm()
        k = int(len(idx) * share * r[c])
        out.append(sorted(idx[t] for t in comb.topk(k).indices.tolist()))
    return out
