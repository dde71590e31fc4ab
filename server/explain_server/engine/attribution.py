"""Second-order token x patch attributions in factorised form.

Source: L. Moeller, P. Tilli, N. T. Vu, S. Pado, "Explaining Caption-Image Interactions in
CLIP Models with Second-Order Attributions", TMLR 2025 (arXiv 2408.14153), Eq. 9-10, in the
factorised form of docs/method.md:

    A[s, p] = < T[:, s], V[:, p] >,  T[:, s] = Jt[:, s, :] dt[s, :],  V[:, p] = Jv[:, p, :] dv[p, :]

with Jt, Jv the Jacobians of the upper towers integrated along the straight path from the
reference hidden states to the input's. The feature-pair matrix and full Jacobians are never
built. Each factor comes either from forward mode (one Jacobian-vector product per column and
quadrature node) or from reverse mode (one vector-Jacobian product per embedding dimension and
node), whichever :func:`choose_mode` estimates cheaper.

Forward mode exploits that the tangent of column s is zero on every row but s. Layer norm and
the q/k/v projections act row-wise, so in the attribution block the tangent changes one key
and one value row (and the query when s is a query row); the attention's tangent follows from
the softmax derivative  d softmax(z) = a * (dz - <a, dz>). Only the rows the block must output
are computed (the pooled row alone when it is the last block). The remaining blocks take the
now dense tangent through ``torch.func.jvp``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import jvp, vjp, vmap

from .towers import Tower

class ExplanationCancelled(Exception):
    """The caller no longer wants the result (cancelled, past its deadline, or shutdown)."""


StopCheck = Callable[[], bool]


def never() -> bool:
    """The default stop check: never stop."""
    return False


# Live tangent-sized copies per dense row in one JVP pass through a block (ln, q/k/v,
# attention, 4x-wide MLP): turns a memory budget into a chunk size.
_TANGENT_COPIES = 12
# Measured (ViT-B-16, CPU): the peak a chunk adds is about 8x that simple count (vmap and
# autograd-forward temporaries), so budgets are divided by it.
_OVERHEAD = 8


def _path(hidden: torch.Tensor, reference: torch.Tensor, alphas: np.ndarray) -> torch.Tensor:
    """h(a_k) = h^r + a_k (h - h^r) for every node: (K, S, d)."""
    nodes = torch.as_tensor(alphas, dtype=hidden.dtype, device=hidden.device)
    return reference + nodes[:, None, None] * (hidden - reference)


def _weights(weights: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    # path sums in at least float32, whatever the model's dtype
    return torch.as_tensor(weights, dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)


def forward_factor(
    tower: Tower,
    layer: int,
    hidden: torch.Tensor,
    reference: torch.Tensor,
    alphas: np.ndarray,
    weights: np.ndarray,
    memory_bytes: int,
    should_stop: StopCheck = never,
) -> torch.Tensor:
    """One tower's factor by forward mode: column s = sum_k w_k J_hi(h(a_k)) [dt on row s, 0 elsewhere].

    Args:
        tower: the tower; f_hi is ``tower.upper(., layer)``.
        layer: block whose input is attributed, in [0, n_layers - 1].
        hidden: the input's hidden states h entering that block, (S, d).
        reference: the reference's hidden states h^r, (S, d), position-aligned with h.
        alphas, weights: quadrature nodes in [0, 1] and weights, (K,) each.
        memory_bytes: budget for the tangent activations of one chunk of columns.
        should_stop: polled before every chunk of columns.

    Returns:
        The factor (D, S), float32 (float64 for a float64 model); its column sum approximates
        f_hi(h) - f_hi(h^r) (method.md), exactly so as the quadrature error vanishes.

    Raises:
        ExplanationCancelled: ``should_stop()`` turned true.
    """
    path = _path(hidden, reference, alphas)  # (K, S, d)
    delta = hidden - reference
    n_nodes, seq, width = path.shape
    block = tower.blocks[layer]
    heads = block.attn.num_heads
    head_dim = width // heads
    scale = 1.0 / math.sqrt(head_dim)
    rows = tower.query_rows(layer, seq)
    row_ids = torch.arange(seq, device=path.device)[rows]  # (Q,)
    n_rows = len(row_ids)
    mask = tower.mask(seq)
    w_q, w_k, w_v = block.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = block.attn.in_proj_bias.chunk(3) if block.attn.in_proj_bias is not None else (None,) * 3

    # The primal of the attribution block, shared by every tangent.
    y = block.ln_1(path)
    q = F.linear(y[:, rows], w_q, b_q).view(n_nodes, n_rows, heads, head_dim).transpose(1, 2)  # (K, H, Q, e)
    k = F.linear(y, w_k, b_k).view(n_nodes, seq, heads, head_dim).transpose(1, 2)  # (K, H, S, e)
    v = F.linear(y, w_v, b_v).view(n_nodes, seq, heads, head_dim).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores + mask[rows].to(scores.dtype)
    attn = scores.softmax(dim=-1)  # (K, H, Q, S)
    out = (attn @ v).transpose(1, 2).reshape(n_nodes, n_rows, width)
    x1 = path[:, rows] + block.ls_1(block.attn.out_proj(out))  # the attention half's output

    def finish(x: torch.Tensor) -> torch.Tensor:
        return tower.finish(x, layer)

    def directional(tangent: torch.Tensor) -> torch.Tensor:
        return jvp(finish, (x1,), (tangent,))[1]

    w = _weights(weights, path)
    per_column = _OVERHEAD * path.element_size() * n_nodes * (4 * heads * n_rows * seq + _TANGENT_COPIES * n_rows * width)
    chunk = max(1, min(seq, memory_bytes // per_column))
    columns = []
    for start in range(0, seq, chunk):
        if should_stop():
            raise ExplanationCancelled()
        cols = torch.arange(start, min(seq, start + chunk), device=path.device)
        c = len(cols)
        # ln_1 is row-wise: the tangent stays on row s.
        x_rows = path[:, cols].transpose(0, 1)  # (c, K, d)
        y_dot = jvp(block.ln_1, (x_rows,), (delta[cols][:, None, :].expand_as(x_rows),))[1]
        k_dot = F.linear(y_dot, w_k).view(c, n_nodes, heads, head_dim)
        v_dot = F.linear(y_dot, w_v).view(c, n_nodes, heads, head_dim)
        # Score tangent (c, K, H, Q, S): key row s moved, for every query row ...
        z_dot = torch.zeros((c, n_nodes, heads, n_rows, seq), dtype=path.dtype, device=path.device)
        qk = torch.einsum("khqe,ckhe->ckhq", q, k_dot) * scale
        z_dot.scatter_(-1, cols.view(c, 1, 1, 1, 1).expand(c, n_nodes, heads, n_rows, 1), qk.unsqueeze(-1))
        # ... and, when row s is itself a query row, its query moved against every key.
        is_query = cols[:, None] == row_ids[None, :]  # (c, Q)
        if is_query.any():
            q_dot = F.linear(y_dot, w_q).view(c, n_nodes, heads, head_dim)
            qdk = torch.einsum("ckhe,khse->ckhs", q_dot, k) * scale
            z_dot = z_dot + is_query[:, None, None, :, None] * qdk[:, :, :, None, :]
        a_dot = attn * (z_dot - (attn * z_dot).sum(dim=-1, keepdim=True))
        a_at_s = attn.unsqueeze(0).expand(c, -1, -1, -1, -1).gather(
            -1, cols.view(c, 1, 1, 1, 1).expand(c, n_nodes, heads, n_rows, 1)
        )
        o_dot = a_dot @ v + a_at_s * v_dot[:, :, :, None, :]  # (c, K, H, Q, e)
        out_dot = F.linear(o_dot.transpose(2, 3).reshape(c, n_nodes, n_rows, width), block.attn.out_proj.weight)
        x1_dot = block.ls_1(out_dot) + is_query[:, None, :, None] * delta[cols][:, None, None, :]
        products = vmap(directional)(x1_dot)  # (c, K, D)
        columns.append(torch.einsum("ckd,k->dc", products.to(w.dtype), w))
    return torch.cat(columns, dim=1)


def reverse_factor(
    tower: Tower,
    layer: int,
    hidden: torch.Tensor,
    reference: torch.Tensor,
    alphas: np.ndarray,
    weights: np.ndarray,
    memory_bytes: int,
    should_stop: StopCheck = never,
) -> torch.Tensor:
    """The same factor as :func:`forward_factor` by reverse mode: one pullback per embedding dimension.

    T[e, s] = sum_k w_k < d f_hi[e] / d h (h(a_k))[s, :], dt[s, :] >. Cheaper than forward mode
    only when the sequence is much longer than the embedding (see :func:`choose_mode`).
    """
    path = _path(hidden, reference, alphas)
    delta = hidden - reference
    n_nodes, seq, width = path.shape
    w = _weights(weights, path)
    rows = []
    with torch.enable_grad():  # callers run under no_grad; reverse mode needs the graph
        embedding, pullback = vjp(lambda h: tower.upper(h, layer), path)
        dim = embedding.shape[1]
        eye = torch.eye(dim, dtype=embedding.dtype, device=embedding.device)
        per_row = _OVERHEAD * path.element_size() * n_nodes * seq * width * 3 * _TANGENT_COPIES
        chunk = max(1, min(dim, memory_bytes // per_row))
        for start in range(0, dim, chunk):
            if should_stop():
                raise ExplanationCancelled()
            cotangents = eye[start : start + chunk, None, :].expand(-1, n_nodes, -1)  # (c, K, D)
            grads = vmap(pullback)(cotangents)[0]  # (c, K, S, d)
            rows.append(torch.einsum("cksd,sd,k->cs", grads.detach().to(w.dtype), delta.to(w.dtype), w))
    return torch.cat(rows, dim=0)


def _block_flops(seq: int, rows: int, width: int) -> float:
    """Multiply-adds of one block computing ``rows`` output rows from ``seq`` rows."""
    return 2 * seq * width**2 + rows * (10 * width**2 + 2 * seq * width)


def choose_mode(tower: Tower, layer: int, seq: int, embed_dim: int) -> str:
    """'forward' or 'reverse', whichever costs fewer multiply-adds for this tower and layer.

    Forward mode: S columns, each an attribution block on one row (about 13 d^2) plus the later
    blocks at full cost. Reverse mode: D pullbacks, each about twice the forward cost of f_hi.
    """
    width = tower.blocks[layer].attn.embed_dim
    last = tower.n_layers - 1
    later = sum(_block_flops(seq, 1 if i == last else seq, width) for i in range(layer + 1, tower.n_layers))
    query_rows = 1 if layer == last else seq
    first_sparse = 3 * width**2 + query_rows * (9 * width**2 + 4 * seq * width)
    upper = _block_flops(seq, query_rows, width) + later
    forward_cost = seq * (first_sparse + later)
    reverse_cost = embed_dim * 2 * upper
    return "forward" if forward_cost <= reverse_cost else "reverse"


FACTORS = {"forward": forward_factor, "reverse": reverse_factor}


@dataclass(frozen=True)
class Attribution:
    """The explanation of one (caption, image) pair, in cosine units.

    Attributes:
        interactions: A / (||e_t|| ||e_v||), float64 (S_t, S_v); column 0 is the class token,
            columns 1.. the patches in row-major order.
        score: cosine s(t, v).
        text_reference: <e_t^r, e_v> / (||e_t|| ||e_v||).
        image_reference: <e_t, e_v^r> / (||e_t|| ||e_v||).
        both_references: <e_t^r, e_v^r> / (||e_t|| ||e_v||).
        convergence_delta: score - (sum(interactions) + text_reference + image_reference
            - both_references); zero up to quadrature error (method.md).
    """

    interactions: np.ndarray
    score: float
    text_reference: float
    image_reference: float
    both_references: float
    convergence_delta: float


def combine(
    text_factor: torch.Tensor,
    image_factor: torch.Tensor,
    text_endpoints: torch.Tensor,
    image_endpoints: torch.Tensor,
) -> Attribution:
    """Interactions, score and reference terms from the two factors and the path endpoints.

    Args:
        text_factor: T, (D, S_t).
        image_factor: V, (D, S_v).
        text_endpoints: (2, D): e_t = f_hi(h_t) and e_t^r = f_hi(h_t^r) (pooled at the caption's end token).
        image_endpoints: (2, D): e_v and e_v^r.

    Returns:
        The :class:`Attribution`; every term is divided by ||e_t|| ||e_v|| (method.md).
    """
    e_t, e_t_ref = text_endpoints.double()
    e_v, e_v_ref = image_endpoints.double()
    norm = e_t.norm() * e_v.norm()
    interactions = (text_factor.T.double() @ image_factor.double()) / norm
    score = float(e_t @ e_v / norm)
    text_reference = float(e_t_ref @ e_v / norm)
    image_reference = float(e_t @ e_v_ref / norm)
    both_references = float(e_t_ref @ e_v_ref / norm)
    total = float(interactions.sum()) + text_reference + image_reference - both_references
    return Attribution(
        interactions=interactions.cpu().numpy(),
        score=score,
        text_reference=text_reference,
        image_reference=image_reference,
        both_references=both_references,
        convergence_delta=score - total,
    )
