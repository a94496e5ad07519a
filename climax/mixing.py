"""Several training loaders mixed by weight in one run (``MixedLoader``): e.g. five CMIP6 datasets
with different variable sets. Works on anything with ``ForecastLoader``'s ``__len__``,
``iterate(epoch, start_batch)`` and ``dataset.name`` (``climax.data``).

Imports neither Ray nor ``pipelines``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["MixedLoader"]


class MixedLoader:
    """Several ForecastLoaders (e.g. five CMIP6 datasets) mixed by weight in one run.

    Each step draws which loader gives the batch from ``rng(seed, epoch)``: the same draw on every
    rank, so DDP ranks use the same variable set each step. Each loader's batches form one endless
    stream over its own epochs 0, 1, 2, ...; a loader that runs out restarts on its next epoch, and
    where a mixed epoch starts in each stream follows from the draws of the earlier epochs, so
    ``set_epoch`` resumes exactly. ``weights`` default to the loaders' lengths (each loader then
    passes through about one of its epochs per mixed epoch).
    """

    def __init__(self, loaders: Sequence[Any], weights: Sequence[float] | None = None, seed: int = 0):
        self.loaders = list(loaders)
        if not self.loaders:
            raise ValueError("MixedLoader needs at least one loader")
        self.lengths = [len(ld) for ld in self.loaders]
        empty = [ld.dataset.name for ld, n in zip(self.loaders, self.lengths) if n == 0]
        if empty:
            raise ValueError(f"loader(s) of {empty} have no batch in an epoch")
        w = np.asarray(self.lengths if weights is None else weights, dtype=np.float64)
        if w.shape != (len(self.loaders),) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be {len(self.loaders)} non-negative numbers, not all zero; got {weights}")
        self.weights = w / w.sum()
        self.seed, self.epoch = seed, 0
        self._consumed: dict[int, np.ndarray] = {0: np.zeros(len(self.loaders), np.int64)}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return sum(self.lengths)

    def draws(self, epoch: int) -> np.ndarray:
        """Which loader gives each step of ``epoch`` (the same on every rank)."""
        return np.random.default_rng([self.seed, epoch]).choice(len(self.loaders), size=len(self), p=self.weights)

    def _start(self, epoch: int) -> np.ndarray:
        """Batches each loader's stream gave before ``epoch``."""
        e = max(k for k in self._consumed if k <= epoch)
        acc = self._consumed[e].copy()
        for k in range(e, epoch):
            acc += np.bincount(self.draws(k), minlength=len(self.loaders))
            self._consumed[k + 1] = acc.copy()
        return acc

    def __iter__(self) -> Iterator[Any]:
        draws = self.draws(self.epoch)
        pos = self._start(self.epoch)
        iters: list[Iterator[Any] | None] = [None] * len(self.loaders)
        try:
            for i in draws:
                while True:
                    if iters[i] is None:
                        ep, off = divmod(int(pos[i]), self.lengths[i])
                        iters[i] = self.loaders[i].iterate(ep, off)
                    batch = next(iters[i], None)
                    if batch is not None:
                        break
                    iters[i] = None  # this loader's epoch ended: the next one starts
                    pos[i] = -(-pos[i] // self.lengths[i]) * self.lengths[i]
                pos[i] += 1
                yield batch
        finally:
            for it in iters:
                if it is not None:
                    it.close()
