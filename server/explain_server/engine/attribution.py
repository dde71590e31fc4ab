"""Second-order token x patch attributions in factorised form.

Source: L. Moeller, P. Tilli, N. T. Vu, S. Pado, "Explaining Caption-Image Interactions in
CLIP Models with Second-Order Attributions", TMLR 2025 (arXiv 2408.14153), Eq. 9-10, in the
factorised form of docs/method.md:

    A[s, p] = < T[:, s], V[:, p] >,  T[:, s] = Jt[:, s, :] dt[s, :],  V[:, p] = Jv[:, p, :] dv[p, :]

with Jt, Jv the Jacobians of the upper towers integrated along the straight path from the
reference hidden states to the input's. The feature-pair matrix and full Jacobians are never
built: each column of a factor is one forward-mode Jacobian-vector product per quadrature node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.func import jvp, vmap

UpperTower = Callable[[torch.Tensor], torch.Tensor]

# Live tangent-sized tensors in one JVP pass through a block (ln, q/k/v, attention, 4x-wide
# MLP), used to turn a memory budget into a tangent chunk size.
_TANGENT_COPIES = 12


def attribution_factor(
    upper: UpperTower,
    hidden: torch.Tensor,
    reference: torch.Tensor,
    alphas: np.ndarray,
    weights: np.ndarray,
    memory_bytes: int,
) -> torch.Tensor:
    """One tower's attribution factor: column s is sum_k w_k J_hi(h(a_k)) [dt on row s, 0 elsewhere].

    Args:
        upper: f_hi, mapping hidden states (B, S, d) to embeddings (B, D).
        hidden: the input's hidden states h, shape (S, d).
        reference: the reference's hidden states h^r, shape (S, d), position-aligned with h.
        alphas: quadrature nodes in [0, 1], shape (K,); path h(a) = h^r + a (h - h^r).
        weights: quadrature weights, shape (K,).
        memory_bytes: budget for the tangent activations of one chunk of columns.

    Returns:
        The factor, shape (D, S), float32 (float64 for a float64 model); its column sum approximates f_hi(h) - f_hi(h^r)
        (method.md), exactly so as the quadrature error vanishes.
    """
    delta = hidden - reference
    seq, width = delta.shape
    nodes = torch.as_tensor(alphas, dtype=hidden.dtype, device=hidden.device)
    # path sums in at least float32, whatever the model's dtype
    accumulate = torch.promote_types(hidden.dtype, torch.float32)
    w = torch.as_tensor(weights, dtype=accumulate, device=hidden.device)
    path = reference + nodes[:, None, None] * delta  # (K, S, d)

    def directional(tangent: torch.Tensor) -> torch.Tensor:
        return jvp(upper, (path,), (tangent,))[1]

    per_column = len(alphas) * seq * width * hidden.element_size() * _TANGENT_COPIES
    chunk = max(1, min(seq, memory_bytes // per_column))
    columns = []
    for start in range(0, seq, chunk):
        rows = torch.arange(start, min(seq, start + chunk), device=hidden.device)
        tangents = torch.zeros((len(rows), len(alphas), seq, width), dtype=hidden.dtype, device=hidden.device)
        tangents[torch.arange(len(rows)), :, rows, :] = delta[rows][:, None, :]
        products = vmap(directional)(tangents)  # (c, K, D)
        columns.append(torch.einsum("ckd,k->dc", products.to(accumulate), w))
    return torch.cat(columns, dim=1)


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
