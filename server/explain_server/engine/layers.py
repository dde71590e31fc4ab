"""What a tower's positions are at each layer; torch-free, so the front end can describe models."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layer:
    """A layer whose input a user may attribute: what its positions are.

    Attributes:
        name: readable name: ``block 11`` for transformers, ``layer4`` or ``stages.3`` for
            convolutional stages, ``head`` for the pooling head's input.
        grid: image towers: (Gh, Gw), the grid the positions after the prefix form, row 0 at
            the top of the model input; None for text towers.
        prefix: labels of the positions before the grid (``cls``, ``reg0``, ...); empty for
            text towers and for towers without prefix tokens.
    """

    name: str
    grid: tuple[int, int] | None = None
    prefix: tuple[str, ...] = ()

    @property
    def positions(self) -> int | None:
        """S for an image layer (prefix plus grid); None for text, whose S is the caption's."""
        return None if self.grid is None else len(self.prefix) + self.grid[0] * self.grid[1]
