"""Quadrature rules for the path integral of the integrated Jacobians.

The names and node placements are Captum's (``captum.attr._utils.approximation_methods``):
the path runs from the reference (alpha = 0) to the input (alpha = 1). exclip integrates
with nodes 1, 1 - 1/N, ..., 1/N and weights 1/N, which is Captum's ``riemann_right``.
"""

from __future__ import annotations

import functools

import numpy as np

METHODS = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def min_n_steps(method: str) -> int:
    """The fewest nodes ``method`` takes: 2 for ``riemann_trapezoid`` (both ends), 1 otherwise."""
    return 2 if method == "riemann_trapezoid" else 1


def check_rule(method: str, n_steps: int) -> None:
    """Check a quadrature setting without building it (cheap for any ``n_steps``).

    Raises:
        ValueError: unknown method, or n_steps below :func:`min_n_steps`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    minimum = min_n_steps(method)
    if n_steps < minimum:
        raise ValueError(f"n_steps must be >= {minimum} for method {method}; got {n_steps}")


def nodes_and_weights(method: str, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes in [0, 1] and their weights for ``integral_0^1 f(alpha) d alpha``.

    Args:
        method: one of :data:`METHODS` (Captum's names).
        n_steps: number of nodes N; ``riemann_trapezoid`` needs N >= 2, the others N >= 1.

    Returns:
        ``(alphas, weights)``, two read-only float64 arrays of shape (N,); weights sum to 1.

    Raises:
        ValueError: unknown method, or n_steps out of range for it.
    """
    check_rule(method, n_steps)
    return _rule(method, n_steps)


@functools.lru_cache(maxsize=64)
def _rule(method: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    # cached: every explanation asks for its rule, and Gauss-Legendre nodes come from an eigenproblem
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        alphas, weights = (x + 1.0) / 2.0, w / 2.0
    elif method == "riemann_trapezoid":
        alphas, weights = np.linspace(0.0, 1.0, n), np.full(n, 1.0 / (n - 1))
        weights[[0, -1]] /= 2.0
    else:
        offset = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}[method]
        alphas, weights = (np.arange(n) + offset) / n, np.full(n, 1.0 / n)
    alphas.setflags(write=False)
    weights.setflags(write=False)
    return alphas, weights
