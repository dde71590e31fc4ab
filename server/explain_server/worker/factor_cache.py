"""A bounded, byte-limited LRU of attribution factors, keyed by :class:`SideKey`.

The caption factor T depends only on (model, caption, options) and the image factor V only
on (model, image, options) (method.md), so one image explained against many captions, or
the reverse, computes that side once.
"""

from __future__ import annotations

import threading

from cachetools import LRUCache

from ..engine.explainer import Factor
from .protocol import SideKey


class FactorCache:
    """Thread-safe LRU of :class:`Factor` s, bounded by their total bytes."""

    def __init__(self, max_bytes: int):
        """Hold at most ``max_bytes`` (0 disables caching)."""
        self._lru: LRUCache = LRUCache(maxsize=max_bytes, getsizeof=lambda factor: factor.nbytes)
        self._lock = threading.Lock()

    def get(self, key: SideKey) -> Factor | None:
        """The factor under ``key`` (now the most recently used), or None."""
        with self._lock:
            return self._lru.get(key)

    def put(self, key: SideKey, factor: Factor) -> None:
        """Store ``factor``, evicting the least recently used; one larger than the whole cache is not kept."""
        with self._lock:
            if factor.nbytes <= self._lru.maxsize:
                self._lru[key] = factor

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        with self._lock:
            return int(self._lru.currsize)
