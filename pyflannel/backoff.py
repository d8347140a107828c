"""The pauses between retries: the one backoff that every retry loop of the agent takes its waits from."""

from __future__ import annotations

import random


class Backoff:
    """Pauses of `first`, then twice the last, up to `cap`; reset() (after a success) starts again at `first`.

    `jitter`, a fraction, spreads each pause by up to that much either way, so that the nodes of a cluster
    retrying against one restarted server do not come back in lockstep. Not thread-safe: one per loop."""

    __slots__ = ("_cur", "cap", "first", "jitter")

    def __init__(self, first: float, cap: float, *, jitter: float = 0.0) -> None:
        self.first = first
        self.cap = max(cap, first)
        self.jitter = jitter
        self._cur = first

    def next(self) -> float:
        """The pause to take now; the following one doubles."""
        d = self._cur
        self._cur = min(d * 2, self.cap)
        return d * random.uniform(1 - self.jitter, 1 + self.jitter) if self.jitter else d

    def reset(self) -> None:
        self._cur = self.first
