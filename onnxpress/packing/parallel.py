"""Thread-pool helpers for packing and unpacking: ordered results with bounded memory.

``ThreadPoolExecutor.map`` submits every item at once and keeps every result until it is
consumed, so unpacking a 10 GB model that way could hold all its decoded tensors in memory.
zstd, hashlib and numpy release the GIL, so threads do run the coding in parallel.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading
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


_shared: ThreadPoolExecutor | None = None
_shared_lock = threading.Lock()


def worker_count(threads: int | None) -> int:
    """``threads``, or every core when None."""
    return max(1, threads or _cores())


@functools.cache
def _cores() -> int:
    """``os.cpu_count()``, asked once: it reads ``/sys`` (9 us, before every session)."""
    return os.cpu_count() or 1


@contextlib.contextmanager
def decoding_pool(threads: int | None) -> Iterator[ThreadPoolExecutor]:
    """A thread pool for decoding: one shared pool of all cores, kept between calls.

    Starting a thread per core for every session costs a millisecond or two, which shows in
    the start time of small models; the shared pool's idle threads cost nothing. An explicit
    ``threads`` gets a pool of its own, shut down on exit.
    """
    global _shared
    if threads is not None:
        with ThreadPoolExecutor(max_workers=worker_count(threads), thread_name_prefix="onnxz") as pool:
            yield pool
        return
    with _shared_lock:
        if _shared is None:
            _shared = ThreadPoolExecutor(max_workers=worker_count(None), thread_name_prefix="onnxz")
    yield _shared
