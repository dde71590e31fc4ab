"""A bounded, byte-limited LRU of attribution factors, keyed by content hashes.

The caption factor T depends only on (model, caption, options) and the image factor V only
on (model, image, options) (method.md), so one image explained against many captions, or
the reverse, computes that side once.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Hashable

from cachetools import LRUCache

from .engine.explainer import Factor
from .inputs import Caption


@dataclass(frozen=True)
class TextEntry:
    """A caption's factor with its tokens (for the response)."""

    factor: Factor
    caption: Caption

    @property
    def nbytes(self) -> int:
        """Approximate memory held, bytes (the tensors dominate)."""
        return self.factor.nbytes


@dataclass(frozen=True)
class ImageEntry:
    """An image's factor with its size after EXIF orientation, (width, height) pixels."""

    factor: Factor
    image_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """Approximate memory held, bytes (the tensors dominate)."""
        return self.factor.nbytes


def digest(data: bytes) -> str:
    """SHA-256 hex digest of ``data``: cache keys never hold user content itself."""
    return hashlib.sha256(data).hexdigest()


class FactorCache:
    """Thread-safe LRU of :class:`TextEntry` / :class:`ImageEntry`, bounded by their total bytes."""

    def __init__(self, max_bytes: int):
        """Hold at most ``max_bytes`` (0 disables caching)."""
        self._lru: LRUCache = LRUCache(maxsize=max_bytes, getsizeof=lambda entry: entry.nbytes)
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> TextEntry | ImageEntry | None:
        """The entry under ``key`` (now the most recently used), or None."""
        with self._lock:
            return self._lru.get(key)

    def put(self, key: Hashable, entry: TextEntry | ImageEntry) -> None:
        """Store ``entry``, evicting the least recently used; an entry larger than the whole cache is not kept."""
        with self._lock:
            if entry.nbytes <= self._lru.maxsize:
                self._lru[key] = entry

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        with self._lock:
            return int(self._lru.currsize)
