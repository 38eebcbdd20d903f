"""Thread-pool helpers for packing and unpacking: ordered results with bounded memory.

``ThreadPoolExecutor.map`` submits every item at once and keeps every result until it is
consumed, so unpacking a 10 GB model that way could hold all its decoded tensors in memory.
zstd, hashlib and numpy release the GIL, so threads do run the coding in parallel.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

_T = TypeVar("_T")
_R = TypeVar("_R")


def bounded_map(
    pool: ThreadPoolExecutor, fn: Callable[[_T], _R], items: list[_T], window: int
) -> Iterator[_R]:
    """``pool.map(fn, items)`` in order, with at most ``window`` tasks submitted and waiting."""
    pending: collections.deque[Future[_R]] = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
