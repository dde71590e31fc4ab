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

The work is split into passes (a set of quadrature nodes, then their columns or embedding
dimensions in chunks), each chunk sized by a :class:`ChunkBudget` of memory and wall time;
stop checks run between chunks.
"""

from __future__ import annotations

import math
import time
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


# Live tangent-sized copies per dense row in one JVP through a block (ln, q/k/v, attention,
# 4x-wide MLP): turns a memory budget into a chunk size.
_TANGENT_COPIES = 12
# Temporaries beyond that count, as a factor on the estimate: with it a chunk stays within its
# budget (measured in docs/benchmarks.md, "Memory of one chunk").
_OVERHEAD = 2
# Row-sized tensors a block's primal keeps for its derivative (normalised inputs, q/k/v,
# attention output, the 4x-wide MLP's input and slope), beside its heads x rows attention.
_PRIMAL_COPIES = 16
# How much each older chunk's timing counts against the next one's, in the time fit.
_DECAY = 0.8
# Chunks are never so small that their fixed overhead takes more than 1 / (1 + this) of them.
_OVERHEAD_SHARE = 4.0


class ChunkBudget:
    """How much one chunk of the engine's work may take: memory, and optionally wall time.

    A chunk is a set of quadrature nodes times a set of columns (forward mode) or of embedding
    dimensions (reverse mode). Stop checks are polled between chunks, so the size of a chunk
    bounds how long a stopped request keeps the model busy.

    Time is budgeted through the cost model's multiply-adds (:func:`forward_costs`): the chunks
    timed so far, weighted down by :data:`_DECAY` per chunk, are fitted by least squares to
    ``seconds = overhead + rate * flops``, and a chunk gets what is left of the target after
    the overhead. The overhead matters on a busy machine, where threads wait on each other at
    every operation: smaller chunks would only multiply it, so a chunk is never so small that
    the overhead takes more than a fifth of it, whatever the target. Until a chunk has been
    timed, a time-bounded budget plans chunks of one node and one column.
    """

    def __init__(self, memory_bytes: int, seconds: float | None = None):
        """Budget ``memory_bytes`` of activations per chunk and, when given, ``seconds`` of wall time."""
        self.memory_bytes = memory_bytes
        self.seconds = seconds
        self._sums = np.zeros(5)  # decayed sums of 1, flops, seconds, flops^2, flops * seconds

    def max_flops(self) -> float:
        """The multiply-adds one chunk may take: infinite without a time budget, 0 before any
        chunk was timed."""
        if self.seconds is None:
            return math.inf
        count, flops, seconds, flops2, product = self._sums
        if count == 0:
            return 0.0
        spread = count * flops2 - flops * flops
        rate = (count * product - flops * seconds) / spread if spread > 1e-6 * count * flops2 else 0.0
        if rate <= 0:  # chunks of one size, or noise: no overhead can be told apart
            rate = seconds / max(flops, 1.0)
        overhead = max(0.0, (seconds - rate * flops) / count)
        return max(self.seconds - overhead, _OVERHEAD_SHARE * overhead) / rate

    def record(self, flops: float, seconds: float) -> None:
        """Learn from a chunk of ``flops`` multiply-adds that took ``seconds``."""
        self._sums = _DECAY * self._sums + np.array([1.0, flops, seconds, flops * flops, flops * seconds])

    def plan(
        self, node_bytes: float, unit_bytes: float, node_flops: float, unit_flops: float, units: int, nodes: int
    ) -> tuple[int, int]:
        """The shape of the next pass: (nodes, units per chunk), each at least 1.

        A pass of n nodes first computes their primal (``n * node_flops``, holding
        ``n * node_bytes``), then runs their units (columns, or embedding dimensions) in chunks
        of ``n * width * unit_flops`` that each add ``n * width * unit_bytes``. Chunks are made
        wide before a pass takes more nodes, which would hold more primal memory.
        """
        budget = self.max_flops()
        by_memory = int((self.memory_bytes - node_bytes) // unit_bytes)
        by_time = units if math.isinf(budget) else int(budget // unit_flops)
        width = max(1, min(units, by_memory, by_time))
        by_memory = int(self.memory_bytes // (node_bytes + width * unit_bytes))
        by_time = nodes if math.isinf(budget) else int(budget // max(node_flops, width * unit_flops))
        return max(1, min(nodes, by_memory, by_time)), width


class _Timed:
    """Times one chunk into a :class:`ChunkBudget` (synchronising CUDA, whose kernels run asynchronously)."""

    def __init__(self, budget: ChunkBudget, flops: float, device: torch.device):
        self.budget, self.flops, self.device = budget, flops, device

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if exc[0] is None and self.budget.seconds is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.budget.record(self.flops, time.perf_counter() - self.start)


@dataclass(frozen=True)
class PathIntegral:
    """One request's path integral on one tower: what a factor is computed from.

    Attributes:
        hidden: the input's hidden states h entering the attribution block, (S, d).
        reference: the reference's hidden states h^r, (S, d), position-aligned with h.
        alphas, weights: quadrature nodes in [0, 1] and weights, (K,) float64 each.
        should_stop: polled between chunks; once true the integral is dropped.
        length: the input's own rows, from the first (S when None); rows from ``length`` on
            are padding after a caption's end token (a causal tower: no row before ``length``
            depends on them), and its factor has ``length`` columns.
        content_length: the ``lengths`` entry f_hi takes for this input (its ids before the
            padding, see :class:`~.split.SplitTower`); ``length`` when None.
    """

    hidden: torch.Tensor
    reference: torch.Tensor
    alphas: np.ndarray
    weights: np.ndarray
    should_stop: StopCheck = never
    length: int | None = None
    content_length: int | None = None

    @property
    def own_rows(self) -> int:
        """The number of rows attributed: the input's own, or all of them for a tower that reads padding."""
        return self.hidden.shape[0] if self.length is None else self.length

    @property
    def content(self) -> int:
        """The ``lengths`` entry of this input for f_hi."""
        return self.own_rows if self.content_length is None else self.content_length


class _Nodes:
    """Quadrature nodes of several integrals stacked on one axis, so one pass serves all.

    ``path`` and ``delta`` are (N, S, d), cut to the ``seq`` rows the pass needs; ``owner``
    (N,) holds each node's integral and ``length`` (N,) that integral's own rows; ``members``
    lists the integrals present, and ``weights`` (len(members), N) holds member r's quadrature
    weights in the columns of its own nodes and zeros elsewhere, so a product with it sums
    each integral's nodes apart from every other's.
    """

    def __init__(self, integrals: list[PathIntegral], nodes: list[tuple[int, int]], seq: int):
        probe = integrals[0].hidden
        device = probe.device
        owners = [i for i, _ in nodes]
        self.members = list(dict.fromkeys(owners))
        self.owner = torch.tensor(owners, device=device)
        self.length = torch.tensor([integrals[i].own_rows for i in owners], device=device)
        alphas = torch.tensor([float(integrals[i].alphas[k]) for i, k in nodes], device=device, dtype=probe.dtype)
        hidden = torch.stack([integrals[i].hidden[:seq] for i in owners])
        reference = torch.stack([integrals[i].reference[:seq] for i in owners])
        self.delta = hidden - reference
        self.path = reference + alphas[:, None, None] * self.delta  # h(a_k) = h^r + a_k (h - h^r)
        # path sums in at least float32, whatever the model's dtype
        dtype = torch.promote_types(probe.dtype, torch.float32)
        self.weights = torch.zeros((len(self.members), len(nodes)), dtype=dtype, device=device)
        row = {index: r for r, index in enumerate(self.members)}
        for column, (i, k) in enumerate(nodes):
            self.weights[row[i], column] = float(integrals[i].weights[k])


def _schedule(integrals: list[PathIntegral]) -> list[tuple[int, int]]:
    """Every (integral, node) pair, longest inputs first, so that passes hold inputs of similar length."""
    order = sorted(range(len(integrals)), key=lambda i: -integrals[i].own_rows)
    return [(i, k) for i in order for k in range(len(integrals[i].alphas))]


def _similar(integrals: list[PathIntegral], queue: list[tuple[int, int]], seq: int) -> int:
    """How many nodes at the head of ``queue`` belong to inputs longer than half of ``seq``.

    A pass computes every input on ``seq`` rows and up to ``seq`` columns: sharing it with far
    shorter inputs would cost them more than computing them apart.
    """
    return next((n for n, (i, _) in enumerate(queue) if 2 * integrals[i].own_rows <= seq), len(queue))


class _Factors:
    """The factors being summed, pass by pass, and which integrals have stopped.

    ``stopped`` holds every integral whose stop check returned true at a poll; its factor is
    None. An integral is polled only while it still has work.
    """

    def __init__(self, integrals: list[PathIntegral], dim: int):
        probe = integrals[0].hidden
        dtype = torch.promote_types(probe.dtype, torch.float32)
        self.integrals = integrals
        self.sums = [torch.zeros((dim, item.own_rows), dtype=dtype, device=probe.device) for item in integrals]
        self.stopped: set[int] = set()

    def poll(self, members: list[int]) -> list[int]:
        """Poll ``members`` not yet stopped; those still wanted, in order."""
        self.stopped |= {i for i in members if i not in self.stopped and self.integrals[i].should_stop()}
        return [i for i in members if i not in self.stopped]

    def pending(self, queue: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """``queue`` without the nodes of stopped integrals, polling the integrals it holds."""
        wanted = set(self.poll(list(dict.fromkeys(i for i, _ in queue))))
        return [node for node in queue if node[0] in wanted]

    def results(self) -> list[torch.Tensor | None]:
        return [None if i in self.stopped else total for i, total in enumerate(self.sums)]


def forward_factors(
    tower: Tower, layer: int, integrals: list[PathIntegral], budget: ChunkBudget
) -> list[torch.Tensor | None]:
    """Factors by forward mode: column s = sum_k w_k J_hi(h(a_k)) [dt on row s, 0 elsewhere].

    The nodes of all integrals share passes (batching across requests), longest inputs first;
    each pass takes a set of nodes through the attribution block's primal once and then
    columns in chunks. Each integral's columns are summed from its own nodes only, so its
    factor does not depend on the others beyond floating-point summation order.

    Args:
        tower: the tower; f_hi is ``tower.upper(., layer, pool)``.
        layer: block whose input is attributed, in [0, n_layers - 1].
        integrals: the integrals, all with the same (padded) sequence length S.
        budget: the memory and time one chunk may take.

    Returns:
        Per integral, in order: the factor (D, own_rows), float32 (float64 for a float64
        model), whose column sum approximates f_hi(h) - f_hi(h^r) (method.md); or None when
        its ``should_stop`` returned true at a poll (polls run before every chunk).
    """
    probe = integrals[0].hidden
    width = probe.shape[1]
    heads = tower.blocks[layer].attn.num_heads
    factors = _Factors(integrals, tower.embed_dim)
    queue = _schedule(integrals)
    while queue := factors.pending(queue):
        seq = integrals[queue[0][0]].own_rows  # the longest input left: later passes need no more rows
        rows = tower.query_rows(layer, torch.zeros(1, dtype=torch.long))
        n_rows = seq if rows is None else rows.shape[1]
        unit_bytes = _OVERHEAD * probe.element_size() * (4 * heads * n_rows * seq + _TANGENT_COPIES * n_rows * width)
        primal, tangent = forward_costs(tower, layer, seq)
        n_nodes, n_columns = budget.plan(
            _primal_bytes(tower, layer, probe, seq), unit_bytes, primal, tangent, seq, _similar(integrals, queue, seq)
        )
        group, queue = queue[:n_nodes], queue[n_nodes:]
        _forward_pass(tower, layer, integrals, group, seq, n_columns, factors, budget, primal, tangent)
    return factors.results()


def _forward_pass(
    tower: Tower,
    layer: int,
    integrals: list[PathIntegral],
    group: list[tuple[int, int]],
    seq: int,
    n_columns: int,
    factors: _Factors,
    budget: ChunkBudget,
    primal_flops: float,
    tangent_flops: float,
) -> None:
    """Add the contributions of the nodes in ``group`` to ``factors``, ``n_columns`` columns at a time."""
    nodes = _Nodes(integrals, group, seq)
    path, delta, owner, w, members = nodes.path, nodes.delta, nodes.owner, nodes.weights, nodes.members
    n_nodes, _, width = path.shape
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

    # The primal of the attribution block and the later blocks' derivative, shared by every tangent.
    with _Timed(budget, n_nodes * primal_flops, path.device):
        y = block.ln_1(path)
        q = (
            F.linear(select_rows(y, rows), w_q, b_q).view(n_nodes, n_rows, heads, head_dim).transpose(1, 2)
        )  # (N, H, Q, e)
        k = F.linear(y, w_k, b_k).view(n_nodes, seq, heads, head_dim).transpose(1, 2)  # (N, H, S, e)
        v = F.linear(y, w_v, b_v).view(n_nodes, seq, heads, head_dim).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) * scale
        if mask is not None:
            scores = scores + mask.to(scores.dtype)
        attn = scores.softmax(dim=-1)  # (N, H, Q, S)
        o = attn @ v  # (N, H, Q, e)
        x1 = select_rows(path, rows) + block.ls_1(
            block.attn.out_proj(o.transpose(1, 2).reshape(n_nodes, n_rows, width))
        )
        finish = tower.linearize_finish(x1, layer, pool)[1]

    start = 0
    while True:
        # an integral leaves the pass once every column left is past its rows, or once stopped
        still = factors.poll([i for i in members if integrals[i].own_rows > start])
        if not still:
            return
        if still != members:
            keep = torch.isin(owner, torch.tensor(still, device=owner.device))
            path, delta, owner, pool, row_ids, q, k, v, attn, o, x1 = (
                t[keep] for t in (path, delta, owner, pool, row_ids, q, k, v, attn, o, x1)
            )
            # w's rows follow ``members`` (positions), ``still`` holds integral indices
            w = w[[members.index(i) for i in still]][:, keep]
            members = still
            n_nodes = len(owner)
            finish = tower.linearize_finish(x1, layer, pool)[1]
        c = min(n_columns, max(integrals[i].own_rows for i in members) - start)
        cols = torch.arange(start, start + c, device=path.device)
        with _Timed(budget, n_nodes * c * tangent_flops, path.device):
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
            o_dot = a_at_s[..., None] * (
                alpha[..., None] * (v_s[:, :, :, None] - o) + v_dot[:, :, :, None]
            )  # (c, N, H, Q, e)
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
            products = finish(x1_dot)  # (c, N, D)
            for index, part in zip(members, torch.einsum("ckd,rk->rdc", products.to(w.dtype), w)):
                own_columns = min(c, integrals[index].own_rows - start)
                factors.sums[index][:, start : start + own_columns] += part[:, :own_columns]
        start += c


def reverse_factors(
    tower: Tower, layer: int, integrals: list[PathIntegral], budget: ChunkBudget
) -> list[torch.Tensor | None]:
    """The same factors as :func:`forward_factors` by reverse mode: one pullback per embedding dimension.

    T[e, s] = sum_k w_k < d f_hi[e] / d h (h(a_k))[s, :], dt[s, :] >. Cheaper than forward mode
    only when the sequence is much longer than the embedding (see :func:`choose_mode`). Each
    pass takes a set of nodes forward once and pulls back embedding dimensions in chunks; an
    integral whose ``should_stop`` returns true at a poll (before every chunk) gets None, and
    a pass whose integrals have all stopped ends. Padding rows get zero gradients and are cut off.
    """
    probe = integrals[0].hidden
    width = probe.shape[1]
    dim = tower.embed_dim
    factors = _Factors(integrals, dim)
    queue = _schedule(integrals)
    while queue := factors.pending(queue):
        seq = integrals[queue[0][0]].own_rows
        unit_bytes = _OVERHEAD * probe.element_size() * seq * width * 3 * _TANGENT_COPIES
        upper = forward_costs(tower, layer, seq)[0]
        n_nodes, n_dims = budget.plan(
            _primal_bytes(tower, layer, probe, seq), unit_bytes, upper, 2 * upper, dim, _similar(integrals, queue, seq)
        )
        group, queue = queue[:n_nodes], queue[n_nodes:]
        nodes = _Nodes(integrals, group, seq)
        members = nodes.members
        with torch.enable_grad():  # callers run under no_grad; reverse mode needs the graph
            with _Timed(budget, len(group) * upper, probe.device):
                pullback = vjp(lambda h: tower.upper(h, layer, nodes.length), nodes.path)[1]
            eye = torch.eye(dim, dtype=probe.dtype, device=probe.device)
            for start in range(0, dim, n_dims):
                if not factors.poll(members):
                    break
                cotangents = eye[start : start + n_dims, None, :].expand(-1, len(group), -1)  # (c, N, D)
                with _Timed(budget, len(group) * len(cotangents) * 2 * upper, probe.device):
                    grads = vmap(pullback)(cotangents)[0].detach()  # (c, N, S, d)
                    w = nodes.weights
                    parts = torch.einsum("cksd,ksd,rk->rcs", grads.to(w.dtype), nodes.delta.to(w.dtype), w)
                for index, part in zip(members, parts):
                    own = integrals[index].own_rows
                    factors.sums[index][start : start + n_dims] += part[:, :own]
    return factors.results()


def _primal_bytes(tower: Tower, layer: int, probe: torch.Tensor, seq: int) -> float:
    """Memory the primal of f_hi holds for one node while its tangents run (or its pullbacks)."""
    width, heads = tower.blocks[layer].attn.embed_dim, tower.blocks[layer].attn.num_heads
    return probe.element_size() * seq * (_PRIMAL_COPIES * width + heads * seq) * (tower.n_layers - layer)


def forward_costs(tower: Tower, layer: int, seq: int) -> tuple[float, float]:
    """The cost model: multiply-adds of f_hi on one node of ``seq`` rows (its primal), and of
    one column's tangent through it in forward mode (a pullback costs about twice the primal)."""
    width = tower.blocks[layer].attn.embed_dim
    last = tower.n_layers - 1
    later = sum(_block_flops(seq, 1 if i == last else seq, width) for i in range(layer + 1, tower.n_layers))
    query_rows = 1 if layer == last else seq
    first_sparse = 3 * width**2 + query_rows * (9 * width**2 + 4 * seq * width)
    return _block_flops(seq, query_rows, width) + later, first_sparse + later


def _block_flops(seq: int, rows: int, width: int) -> float:
    """Multiply-adds of one block computing ``rows`` output rows from ``seq`` rows."""
    return 2 * seq * width**2 + rows * (10 * width**2 + 2 * seq * width)


def choose_mode(tower: Tower, layer: int, seq: int, embed_dim: int) -> str:
    """'forward' or 'reverse', whichever costs fewer multiply-adds for this tower and layer.

    Forward mode: S columns, each an attribution block on one row (about 13 d^2) plus the later
    blocks at full cost. Reverse mode: D pullbacks, each about twice the forward cost of f_hi.
    """
    upper, tangent = forward_costs(tower, layer, seq)
    return "forward" if seq * tangent <= embed_dim * 2 * upper else "reverse"


FACTORS = {"forward": forward_factors, "reverse": reverse_factors}


@dataclass(frozen=True)
class Attribution:
    """The explanation of one (caption, image) pair, in cosine units.

    Attributes:
        interactions: A / (||e_t|| ||e_v||), float64 (S_t, S_v); the image layer's prefix
            tokens (a class token, registers) first, then its grid cells in row-major order.
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
