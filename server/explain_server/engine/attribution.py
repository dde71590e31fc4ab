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
the softmax derivative  d softmax(z) = a * (dz - <a, dz>), which for one moved score (r, s)
collapses to a_rs dz_rs (e_s - a_r): no (rows x keys) tangent is built. Only the rows the
block must output are computed (the pooled row alone when it is the last block). The
remaining blocks take the now dense tangent through ``torch.func.jvp``.

Inputs of different lengths (captions) share passes, padded to the longest: in a causal tower
a tangent on a row past the end token cannot reach the pooled row, so those columns are zero,
and they are not computed once every input still in the pass has ended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import jvp, vjp, vmap

from .towers import Tower, mask_rows, select_rows

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


@dataclass(frozen=True)
class PathIntegral:
    """One request's path integral on one tower: what a factor is computed from.

    Attributes:
        hidden: the input's hidden states h entering the attribution block, (S, d).
        reference: the reference's hidden states h^r, (S, d), position-aligned with h.
        alphas, weights: quadrature nodes in [0, 1] and weights, (K,) float64 each.
        should_stop: polled between chunks; once true the integral is dropped.
        length: the input's own rows, from the first (S when None); rows from ``length`` on
            are padding after a caption's end token, and its factor has ``length`` columns.
    """

    hidden: torch.Tensor
    reference: torch.Tensor
    alphas: np.ndarray
    weights: np.ndarray
    should_stop: StopCheck = never
    length: int | None = None

    @property
    def own_rows(self) -> int:
        """The number of rows that are the input's own (not padding)."""
        return self.hidden.shape[0] if self.length is None else self.length


class _Nodes:
    """The quadrature nodes of several integrals stacked on one axis, so one pass serves all.

    ``path`` and ``delta`` are (N, S, d) with N the total node count; ``owner`` and ``length``
    (N,) say whose node it is and how many rows that input owns; ``weights`` (R, N) holds
    integral r's quadrature weights in the columns of its own nodes and zeros elsewhere, so a
    product with it sums each integral's nodes apart from every other's.
    """

    def __init__(self, integrals: list[PathIntegral]):
        probe = integrals[0].hidden
        counts = [len(item.alphas) for item in integrals]
        owner = np.repeat(np.arange(len(integrals)), counts)
        self.owner = torch.from_numpy(owner).to(probe.device)
        self.length = torch.tensor([item.own_rows for item in integrals], device=probe.device)[self.owner]
        alphas = torch.from_numpy(np.concatenate([item.alphas for item in integrals])).to(probe.device, probe.dtype)
        hidden = torch.stack([item.hidden for item in integrals])
        reference = torch.stack([item.reference for item in integrals])
        self.delta = (hidden - reference)[self.owner]
        self.path = reference[self.owner] + alphas[:, None, None] * self.delta  # h(a_k) = h^r + a_k (h - h^r)
        # path sums in at least float32, whatever the model's dtype
        dtype = torch.promote_types(probe.dtype, torch.float32)
        weights = torch.from_numpy(np.concatenate([item.weights for item in integrals])).to(probe.device, dtype)
        self.weights = torch.zeros((len(integrals), len(owner)), dtype=dtype, device=probe.device)
        self.weights[self.owner, torch.arange(len(owner), device=probe.device)] = weights


def _groups(integrals: list[PathIntegral], node_bytes: int, memory_bytes: int) -> list[list[int]]:
    """Consecutive integrals packed so that one column over all their nodes fits ``memory_bytes``."""
    groups: list[list[int]] = []
    used = 0
    for index, item in enumerate(integrals):
        cost = node_bytes * len(item.alphas)
        if groups and used + cost <= memory_bytes:
            groups[-1].append(index)
            used += cost
        else:
            groups.append([index])
            used = cost
    return groups


def forward_factors(
    tower: Tower, layer: int, integrals: list[PathIntegral], memory_bytes: int
) -> list[torch.Tensor | None]:
    """Factors by forward mode: column s = sum_k w_k J_hi(h(a_k)) [dt on row s, 0 elsewhere].

    The nodes of all integrals go through each pass together (batching across requests);
    each integral's columns are summed from its own nodes only, so its factor does not depend
    on the others beyond floating-point summation order.

    Args:
        tower: the tower; f_hi is ``tower.upper(., layer, pool)``.
        layer: block whose input is attributed, in [0, n_layers - 1].
        integrals: the integrals, all with the same (padded) sequence length S.
        memory_bytes: budget for the tangent activations of one chunk.

    Returns:
        Per integral, in order: the factor (D, own_rows), float32 (float64 for a float64
        model), whose column sum approximates f_hi(h) - f_hi(h^r) (method.md); or None when
        its ``should_stop`` turned true (it is then dropped from the remaining chunks).
    """
    probe = integrals[0].hidden
    seq, width = probe.shape
    heads = tower.blocks[layer].attn.num_heads
    rows = tower.query_rows(layer, torch.zeros(1, dtype=torch.long))
    n_rows = seq if rows is None else rows.shape[1]
    node_bytes = _OVERHEAD * probe.element_size() * (4 * heads * n_rows * seq + _TANGENT_COPIES * n_rows * width)
    results: list[torch.Tensor | None] = []
    for group in _groups(integrals, node_bytes, memory_bytes):
        results += _forward_group(tower, layer, [integrals[i] for i in group], node_bytes, memory_bytes)
    return results


def _forward_group(
    tower: Tower, layer: int, integrals: list[PathIntegral], node_bytes: int, memory_bytes: int
) -> list[torch.Tensor | None]:
    nodes = _Nodes(integrals)
    path, delta, owner, w = nodes.path, nodes.delta, nodes.owner, nodes.weights
    n_nodes, seq, width = path.shape
    block = tower.blocks[layer]
    heads = block.attn.num_heads
    head_dim = width // heads
    scale = 1.0 / math.sqrt(head_dim)
    pool = tower.pool_rows(nodes.length)  # (N,)
    rows = tower.query_rows(layer, pool)  # (N, Q), or None for all rows
    row_ids = torch.arange(seq, device=path.device).expand(n_nodes, seq) if rows is None else rows
    n_rows = row_ids.shape[1]
    mask = mask_rows(tower.mask(seq), rows)
    w_q, w_k, w_v = block.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = block.attn.in_proj_bias.chunk(3) if block.attn.in_proj_bias is not None else (None,) * 3

    # The primal of the attribution block, shared by every tangent.
    y = block.ln_1(path)
    q = F.linear(select_rows(y, rows), w_q, b_q).view(n_nodes, n_rows, heads, head_dim).transpose(1, 2)  # (N, H, Q, e)
    k = F.linear(y, w_k, b_k).view(n_nodes, seq, heads, head_dim).transpose(1, 2)  # (N, H, S, e)
    v = F.linear(y, w_v, b_v).view(n_nodes, seq, heads, head_dim).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores + mask.to(scores.dtype)
    attn = scores.softmax(dim=-1)  # (N, H, Q, S)
    o = attn @ v  # (N, H, Q, e)
    x1 = select_rows(path, rows) + block.ls_1(block.attn.out_proj(o.transpose(1, 2).reshape(n_nodes, n_rows, width)))

    alive = list(range(len(integrals)))
    stopped: set[int] = set()
    columns: dict[int, list[torch.Tensor]] = {i: [] for i in alive}
    start = 0
    while True:
        stopped |= {i for i in alive if integrals[i].should_stop()}
        # an integral leaves the pass once stopped, or once every column left is past its rows
        still = [i for i in alive if i not in stopped and integrals[i].own_rows > start]
        if not still:
            break
        if still != alive:
            keep = torch.isin(owner, torch.tensor(still, device=owner.device))
            path, delta, owner, pool, row_ids, q, k, v, attn, o, x1 = (
                t[keep] for t in (path, delta, owner, pool, row_ids, q, k, v, attn, o, x1)
            )
            # w's rows follow ``alive`` (positions), ``still`` holds integral indices
            w = w[[alive.index(i) for i in still]][:, keep]
            alive = still
            n_nodes = len(owner)
        end = max(integrals[i].own_rows for i in alive)
        chunk = max(1, min(end - start, memory_bytes // (node_bytes * n_nodes)))
        cols = torch.arange(start, start + chunk, device=path.device)
        start += chunk
        c = len(cols)
        # ln_1 is row-wise: the tangent stays on row s.
        x_rows = path[:, cols].transpose(0, 1)  # (c, N, d)
        y_dot = jvp(block.ln_1, (x_rows,), (delta[:, cols].transpose(0, 1),))[1]
        k_dot = F.linear(y_dot, w_k).view(c, n_nodes, heads, head_dim)
        v_dot = F.linear(y_dot, w_v).view(c, n_nodes, heads, head_dim)
        # Key and value row s moved, for every query row r: only score (r, s) moves, by
        # alpha_r = <q_r, k_dot_s> / sqrt(e), so d o_r = a_rs (alpha_r (v_s - o_r) + v_dot_s).
        alpha = torch.einsum("nhqe,cnhe->cnhq", q, k_dot) * scale
        a_at_s = attn.permute(3, 0, 1, 2)[cols]  # (c, N, H, Q)
        v_s = v.permute(2, 0, 1, 3)[cols]  # (c, N, H, e)
        o_dot = a_at_s[..., None] * (alpha[..., None] * (v_s[:, :, :, None] - o) + v_dot[:, :, :, None])  # (c, N, H, Q, e)
        # When row s is itself a query row, its query moved against every key j by
        # beta_j = <q_dot_s, k_j> / sqrt(e): d o_s += sum_j a_sj beta_j (v_j - o_s).
        is_query = cols[:, None, None] == row_ids[None]  # (c, N, Q)
        query_cols = is_query.flatten(1).any(1).nonzero().squeeze(1)
        if len(query_cols):
            own = is_query[query_cols]  # (c', N, Q), at most one query row per column and node
            q_dot = F.linear(y_dot[query_cols], w_q).view(len(query_cols), n_nodes, heads, head_dim)
            beta = torch.einsum("cnhe,nhse->cnhs", q_dot, k) * scale
            slot = own.int().argmax(-1)  # (c', N): where row s sits among the Q query rows
            node = torch.arange(n_nodes, device=path.device)
            a_row, o_row = attn[node, :, slot], o[node, :, slot]  # (c', N, H, S), (c', N, H, e)
            weighted = a_row * beta  # (c', N, H, S)
            o_query = torch.einsum("cnhs,nhse->cnhe", weighted, v) - weighted.sum(-1, keepdim=True) * o_row
            o_dot.index_add_(0, query_cols, own[:, :, None, :, None] * o_query[:, :, :, None, :])
        out_dot = F.linear(o_dot.transpose(2, 3).reshape(c, n_nodes, n_rows, width), block.attn.out_proj.weight)
        x1_dot = block.ls_1(out_dot) + is_query[..., None] * delta[:, cols].transpose(0, 1)[:, :, None, :]
        products = vmap(lambda tangent: jvp(lambda x: tower.finish(x, layer, pool), (x1,), (tangent,))[1])(x1_dot)  # (c, N, D)
        for index, part in zip(alive, torch.einsum("ckd,rk->rdc", products.to(w.dtype), w)):
            columns[index].append(part)
    return [
        None if i in stopped else torch.cat(columns[i], dim=1)[:, : integrals[i].own_rows]
        for i in range(len(integrals))
    ]


def reverse_factors(
    tower: Tower, layer: int, integrals: list[PathIntegral], memory_bytes: int
) -> list[torch.Tensor | None]:
    """The same factors as :func:`forward_factors` by reverse mode: one pullback per embedding dimension.

    T[e, s] = sum_k w_k < d f_hi[e] / d h (h(a_k))[s, :], dt[s, :] >. Cheaper than forward mode
    only when the sequence is much longer than the embedding (see :func:`choose_mode`). An
    integral whose ``should_stop`` turns true gets None; the pass ends once all have stopped.
    Padding rows get zero gradients and are cut off.
    """
    probe = integrals[0].hidden
    seq, width = probe.shape
    node_bytes = _OVERHEAD * probe.element_size() * seq * width * 3 * _TANGENT_COPIES
    results: list[torch.Tensor | None] = []
    for group in _groups(integrals, node_bytes, memory_bytes):
        results += _reverse_group(tower, layer, [integrals[i] for i in group], node_bytes, memory_bytes)
    return results


def _reverse_group(
    tower: Tower, layer: int, integrals: list[PathIntegral], node_bytes: int, memory_bytes: int
) -> list[torch.Tensor | None]:
    nodes = _Nodes(integrals)
    n_nodes = len(nodes.owner)
    rows = []
    with torch.enable_grad():  # callers run under no_grad; reverse mode needs the graph
        pool = tower.pool_rows(nodes.length)
        embedding, pullback = vjp(lambda h: tower.upper(h, layer, pool), nodes.path)
        dim = embedding.shape[1]
        eye = torch.eye(dim, dtype=embedding.dtype, device=embedding.device)
        chunk = max(1, min(dim, memory_bytes // (node_bytes * n_nodes)))
        for start in range(0, dim, chunk):
            if all(item.should_stop() for item in integrals):
                return [None] * len(integrals)
            cotangents = eye[start : start + chunk, None, :].expand(-1, n_nodes, -1)  # (c, N, D)
            grads = vmap(pullback)(cotangents)[0].detach()  # (c, N, S, d)
            w = nodes.weights
            rows.append(torch.einsum("cksd,ksd,rk->rcs", grads.to(w.dtype), nodes.delta.to(w.dtype), w))
    factors = torch.cat(rows, dim=1)  # (R, D, S)
    return [None if item.should_stop() else factor[:, : item.own_rows] for item, factor in zip(integrals, factors)]


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


FACTORS = {"forward": forward_factors, "reverse": reverse_factors}


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
