"""One shuffle buffer for every stream of activation rows: a store being read and activations computed on the fly.

Rows go in as they come (in shard / corpus order); once the buffer is full each batch is a uniform random draw
from it, and the holes the draw leaves are closed with rows from the tail, so nothing is copied twice and
memory stays at ``capacity`` rows whatever the size of the stream. At the end the rest is drawn in a random
order. The draws come from the caller's generator, so a stream is reproducible from its seed (that is how a
resumed SAE training run sees the same batches).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]


class ShuffleBuffer:
    """A bounded buffer of rows (plus optional per-row columns) that emits random batches of ``batch_size``."""

    def __init__(
        self,
        capacity: int,
        batch_size: int,
        width: int,
        dtype: torch.dtype,
        generator: torch.Generator,
        columns: dict[str, torch.dtype] | None = None,
    ):
        self.capacity = max(int(capacity), int(batch_size))
        self.batch_size = int(batch_size)
        self.gen = generator
        self.rows = torch.empty(self.capacity, width, dtype=dtype)
        self.cols = {c: torch.empty(self.capacity, dtype=dt) for c, dt in (columns or {}).items()}
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def add(self, rows: torch.Tensor, cols: dict[str, torch.Tensor] | None = None) -> Iterator[Batch]:
        """Take ``rows`` (and the same rows of each column), yielding a random batch each time the buffer fills."""
        s, k = 0, rows.shape[0]
        while s < k:
            take = min(self.capacity - self.n, k - s)
            if take:
                self.rows[self.n : self.n + take] = rows[s : s + take]
                for c, buf in self.cols.items():
                    buf[self.n : self.n + take] = cols[c][s : s + take]
                self.n += take
                s += take
            if self.n == self.capacity:
                yield self._draw()

    def _draw(self) -> Batch:
        """A random batch out of a full buffer; the holes are closed with rows from the tail."""
        n, bs = self.n, self.batch_size
        idx = torch.randperm(n, generator=self.gen)[:bs]
        batch = self.rows[idx], {c: v[idx] for c, v in self.cols.items()}
        tail_start = n - bs
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[idx] = True
        holes = idx[idx < tail_start]
        movers = torch.arange(tail_start, n)[~chosen[tail_start:]]
        self.rows[holes] = self.rows[movers]
        for v in self.cols.values():
            v[holes] = v[movers]
        self.n = tail_start
        return batch

    def drain(self, drop_last: bool = False) -> Iterator[Batch]:
        """Everything left, in a random order; the last batch is shorter unless ``drop_last``. Empties the buffer."""
        n, bs = self.n, self.batch_size
        perm = torch.randperm(n, generator=self.gen)
        self.n = 0
        for s in range(0, n, bs):
            if drop_last and s + bs > n:
                break
            idx = perm[s : s + bs]
            yield self.rows[idx], {c: v[idx] for c, v in self.cols.items()}
