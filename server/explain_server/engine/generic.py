"""Attribution factors of any tower, by batched forward- or reverse-mode AD on f_hi (method.md).

The factor of position s is  T[:, s] = sum_k w_k J_hi(h(a_k)) [dt on row s, 0 elsewhere]: one
Jacobian-vector product of :meth:`SplitTower.upper` per column and quadrature node (forward
mode), or one vector-Jacobian product per embedding dimension and node (reverse mode),
whichever costs less. Nothing here knows the tower's structure: the JVP carries a dense
tangent through f_hi, so this path is the baseline that the structure-aware paths of
engine/towers.py beat where they apply.

Work is split as on the fast path: nodes of all the requests in a batch share passes, longest
inputs first; each pass runs its columns (or dimensions) in chunks sized by the
:class:`ChunkBudget` from a cost profile of f_hi (multiply-adds and bytes of the tensors one
evaluation creates, measured once per tower, layer and length); stop checks run before each chunk.
"""

from __future__ import annotations

import functools

import torch
from torch.func import jvp, vjp, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .attribution import ChunkBudget, PathIntegral, _Factors, _Nodes, _schedule, _similar, _Timed
from .split import PoolSplit, RowSplit, SplitTower

# Live tangent-sized copies per unit of work, as a factor on the bytes one evaluation of f_hi
# creates: a JVP holds a tangent beside each primal tensor, plus temporaries.
_TANGENT_COPIES = 3
# A dense tangent through a linear layer costs what its primal does; through products of two
# moving tensors (attention scores, normalisation), about twice.
_TANGENT_COST = 1.5


class _ByteCounter(TorchDispatchMode):
    """Sums the bytes of the new storage the dispatched operations create (views and in-place
    results share their inputs' storage and are not counted)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in seen:
                self.bytes += tensor.element_size() * tensor.nelement()
        return out


def _measure(function, *args) -> tuple[float, int]:
    """(multiply-adds, bytes of new storage) of ``function(*args)``."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, _ByteCounter() as memory:
        function(*args)
    return max(counter.get_total_flops() / 2, 1.0), max(memory.bytes, 1)


@functools.lru_cache(maxsize=256)
def _profile(
    tower: SplitTower, layer: int, seq: int, width: int, dtype: torch.dtype, device: torch.device, dense: bool
) -> tuple[float, int, float, int]:
    """What one input of ``seq`` positions costs: (multiply-adds, bytes of new storage) of f_hi, then
    of the part one unit of work carries densely: the rest after a row split, the pooled rows'
    tail after a pool split (``dense``, forward mode), else all of f_hi."""
    hidden = torch.zeros((1, seq, width), dtype=dtype, device=device)
    lengths = torch.full((1,), seq, device=device)
    whole = _measure(tower.upper, hidden, layer, lengths)
    split = tower.row_split(layer) if dense else None
    if isinstance(split, PoolSplit):
        with torch.no_grad():
            _, k, _, _, out = split.attend(hidden)
        flops, created = _measure(split.tail, out.flatten(2), hidden, lengths)
        return (*whole, flops + 2 * k.numel(), created + 4 * k.nelement() * k.element_size())
    if isinstance(split, RowSplit):
        with torch.no_grad():
            rows = split.rows(hidden, torch.arange(seq, device=device)[None])
        return (*whole, *_measure(split.rest, rows, lengths))
    return (*whole, *whole)


def choose_mode(tower: SplitTower, seq: int) -> str:
    """'forward' (``seq`` JVPs) or 'reverse' (D VJPs of about twice the primal's cost)."""
    return "forward" if seq * _TANGENT_COST <= 2 * tower.embed_dim else "reverse"


def factors(
    tower: SplitTower, layer: int, integrals: list[PathIntegral], budget: ChunkBudget
) -> list[torch.Tensor | None]:
    """Factors of ``integrals`` on ``tower`` at ``layer``, in the cheaper mode.

    Args:
        tower: f_hi is ``tower.upper(., layer, lengths)``, with each integral's
            ``content_length`` as its length.
        layer: index into ``tower.layers``.
        integrals: the integrals, all with the same (padded) number of positions S.
        budget: the memory and time one chunk may take.

    Returns:
        Per integral, in order: its factor (D, own_rows) in at least float32, whose column sum
        approximates f_hi(h) - f_hi(h^r); or None when its ``should_stop`` returned true at a
        poll (polls run before every chunk).
    """
    seq = integrals[0].hidden.shape[0]
    run = _forward if choose_mode(tower, seq) == "forward" else _reverse
    return run(tower, layer, integrals, budget)


def _lengths(integrals: list[PathIntegral], owner: torch.Tensor) -> torch.Tensor:
    """The ``lengths`` argument of f_hi for each node: its integral's content length."""
    return torch.tensor([integrals[i].content for i in owner.tolist()], device=owner.device)


def _plan(
    tower: SplitTower,
    layer: int,
    integrals: list[PathIntegral],
    queue: list[tuple[int, int]],
    budget: ChunkBudget,
    unit_cost: float,
    units: int | None,
    dense: bool,
) -> tuple[int, int, int, float, float]:
    """The next pass: (rows, nodes, units per chunk, multiply-adds of one node's primal and of one unit).

    ``units`` is the number of units (None: one per column); ``unit_cost`` a unit's cost as a
    multiple of the primal's; ``dense``: forward mode, whose units carry a dense tangent through
    the rest of a row split only.
    """
    probe = integrals[0].hidden
    # the longest input left: later passes need no more rows (all rows when padding is read)
    seq = integrals[queue[0][0]].own_rows
    flops, created, unit_flops, unit_created = _profile(
        tower, layer, seq, probe.shape[1], probe.dtype, probe.device, dense
    )
    n_nodes, width = budget.plan(
        created,
        _TANGENT_COPIES * unit_created,
        flops,
        unit_cost * unit_flops,
        units or seq,
        _similar(integrals, queue, seq),
    )
    return seq, n_nodes, width, flops, unit_cost * unit_flops


def _forward(tower: SplitTower, layer: int, integrals: list[PathIntegral], budget: ChunkBudget) -> list:
    """Forward mode: a chunk is c columns x n nodes, one vmapped JVP whose primal is computed once."""
    factors = _Factors(integrals, tower.embed_dim)
    queue = _schedule(integrals)
    while queue := factors.pending(queue):
        seq, n_nodes, n_columns, primal, tangent = _plan(
            tower, layer, integrals, queue, budget, _TANGENT_COST, None, True
        )
        group, queue = queue[:n_nodes], queue[n_nodes:]
        nodes = _Nodes(integrals, group, seq)
        path, delta, owner, members = nodes.path, nodes.delta, nodes.owner, nodes.members
        lengths = _lengths(integrals, owner)
        split = tower.row_split(layer) or _whole(tower, layer)
        jvps = _pool_jvps if isinstance(split, PoolSplit) else _column_jvps
        start = 0
        while start < seq:
            # an integral leaves the pass once every column left is past its rows, or once stopped
            still = factors.poll([i for i in members if integrals[i].own_rows > start])
            if not still:
                break
            keep = torch.isin(owner, torch.tensor(still, device=owner.device))
            weights = nodes.weights[[members.index(i) for i in still]][:, keep]
            c = min(n_columns, seq - start)
            cols = torch.arange(start, start + c, device=path.device)
            here, moved, content = path[keep], delta[keep], lengths[keep]
            with _Timed(budget, len(here) * (primal + c * tangent), path.device):
                products = jvps(split, here, moved, content, cols)
                parts = torch.einsum("ckd,rk->rdc", products.to(weights.dtype), weights)
            for index, part in zip(still, parts):
                own_columns = min(c, integrals[index].own_rows - start)
                if own_columns > 0:
                    factors.sums[index][:, start : start + own_columns] += part[:, :own_columns]
            start += c
    return factors.results()


def _whole(tower: SplitTower, layer: int) -> RowSplit:
    """f_hi with no row-wise part split off."""
    return RowSplit(lambda x, positions: x, lambda h, lengths: tower.upper(h, layer, lengths))


def _column_jvps(
    split: RowSplit, path: torch.Tensor, delta: torch.Tensor, lengths: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """J_hi(path) applied to ``delta`` on one position at a time: (c, N, D) for the c ``cols``.

    The row-wise part moves the column's own row only, so its JVP runs on that row; the rest
    takes one vmapped JVP over the columns, whose primal is computed once.
    """
    nodes, seq = path.shape[:2]
    positions = torch.arange(seq, device=path.device).expand(nodes, seq)
    primal = split.rows(path, positions)  # (N, S, e)
    count = len(cols)
    row_path = path[:, cols].transpose(0, 1).reshape(count * nodes, 1, -1)
    row_delta = delta[:, cols].transpose(0, 1).reshape(count * nodes, 1, -1)
    row_positions = cols.repeat_interleave(nodes)[:, None]
    moved = jvp(lambda x: split.rows(x, row_positions), (row_path,), (row_delta,))[1]
    tangents = torch.zeros((count, *primal.shape), dtype=primal.dtype, device=primal.device)
    tangents[torch.arange(count), :, cols] = moved.reshape(count, nodes, -1)

    def column(t: torch.Tensor) -> torch.Tensor:
        return jvp(lambda h: split.rest(h, lengths), (primal,), (t,))[1]

    return vmap(column)(tangents)


def _pool_jvps(
    split: PoolSplit, path: torch.Tensor, delta: torch.Tensor, lengths: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """:func:`_column_jvps` for an attention pool, with the attention's tangent in closed form.

    Key and value row s move by the JVP of ``keys_values`` on row s alone; the queries do not
    move, so score (l, s) moves by alpha = <q_l, d k_s> and d o_l = a_ls (alpha (v_s - o_l) +
    d v_s). Only the tail (on the L pooled rows) takes a vmapped JVP. The query rows' own columns
    go through ``split.whole`` densely.
    """
    nodes = path.shape[0]
    first = split.first_key
    queries, k, v, attention, out = split.attend(path)  # out (N, L, H, e)
    embedding = split.tail(out.flatten(2), path, lengths)  # (N, D): one pass over the L pooled rows
    products = embedding.new_zeros((len(cols), *embedding.shape))
    dense = cols < split.query_rows
    if dense.any():
        products[dense] = _column_jvps(split.whole, path, delta, lengths, cols[dense]).to(products.dtype)
    keyed = (cols >= first) & ~dense  # prefix tokens the pool leaves out have no key and no attribution
    keys = cols[keyed]
    count = len(keys)
    if not count:
        return products
    row_path = path[:, keys].transpose(0, 1).reshape(count * nodes, 1, -1)
    row_delta = delta[:, keys].transpose(0, 1).reshape(count * nodes, 1, -1)
    row_positions = keys.repeat_interleave(nodes)[:, None]
    (k_s, v_s), (k_dot, v_dot) = jvp(lambda x: split.keys_values(x, row_positions), (row_path,), (row_delta,))
    k_s, v_s, k_dot, v_dot = (t.reshape(count, nodes, *t.shape[2:]) for t in (k_s, v_s, k_dot, v_dot))  # (c, N, H, e)
    alpha = torch.einsum("nlhe,cnhe->cnhl", queries, k_dot)
    a_s = attention.permute(3, 0, 1, 2)[keys - first]  # (c, N, H, L)
    out_dot = a_s[..., None] * (
        alpha[..., None] * (v_s[:, :, :, None] - out.permute(0, 2, 1, 3)) + v_dot[:, :, :, None]
    )
    out_dot = out_dot.permute(0, 1, 3, 2, 4).flatten(3)  # (c, N, L, H * e)

    def column(t: torch.Tensor) -> torch.Tensor:
        return jvp(lambda o: split.tail(o, path, lengths), (out.flatten(2),), (t,))[1]

    products[keyed] = vmap(column)(out_dot).to(products.dtype)
    return products


def _reverse(tower: SplitTower, layer: int, integrals: list[PathIntegral], budget: ChunkBudget) -> list:
    """Reverse mode: a pass pulls back embedding dimensions in chunks from one forward of its nodes."""
    dim = tower.embed_dim
    factors = _Factors(integrals, dim)
    queue = _schedule(integrals)
    while queue := factors.pending(queue):
        seq, n_nodes, n_dims, primal, pullback_flops = _plan(tower, layer, integrals, queue, budget, 2.0, dim, False)
        group, queue = queue[:n_nodes], queue[n_nodes:]
        nodes = _Nodes(integrals, group, seq)
        members = nodes.members
        lengths = _lengths(integrals, nodes.owner)
        with torch.enable_grad():  # callers run under no_grad; reverse mode needs the graph
            with _Timed(budget, len(group) * primal, nodes.path.device):
                pullback = vjp(lambda h: tower.upper(h, layer, lengths), nodes.path)[1]
            eye = torch.eye(dim, dtype=nodes.path.dtype, device=nodes.path.device)
            for start in range(0, dim, n_dims):
                if not factors.poll(members):
                    break
                cotangents = eye[start : start + n_dims, None, :].expand(-1, len(group), -1)  # (c, N, D)
                with _Timed(budget, len(group) * len(cotangents) * pullback_flops, nodes.path.device):
                    grads = vmap(pullback)(cotangents)[0].detach()  # (c, N, S, d)
                    w = nodes.weights
                    parts = torch.einsum("cksd,ksd,rk->rcs", grads.to(w.dtype), nodes.delta.to(w.dtype), w)
                for index, part in zip(members, parts):
                    own = integrals[index].own_rows
                    factors.sums[index][start : start + n_dims] += part[:, :own]
    return factors.results()
