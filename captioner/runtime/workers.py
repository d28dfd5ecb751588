"""Worker processes that never inherit a live native runtime.

ONNX Runtime sessions, oneDNN/OpenMP pools and a compiled encoder hold threads; a fork() copies the memory but
not the threads, so the child can wait forever on a lock or condition that a thread it does not have was
holding (issue 23: a forked caption worker hung in onnxruntime's session destructor). Every process of ours
that runs a network therefore starts from the `forkserver`: a fresh interpreter (fork + exec) that imports
PRELOAD and nothing that starts a runtime, then forks the workers. Each worker makes its own sessions and pools
after it starts. Its imports are paid once per command, and can overlap the model's loading (`start`).

`pooled` runs a sequence's items in such workers (no torch needed: the light install's `caption` uses it too), in
order; `loader_errors` is the same for a torch DataLoader (training's feature cache). Either way a worker that waits
too long, or dies, is one CaptionerError (exit 1).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
from typing import Any, Callable, Iterator, Sequence

from ..errors import CaptionerError

log = logging.getLogger("captioner")

# spawn where there is no fork server (Windows): also a fresh interpreter, slower to start
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
# What the fork server imports before it forks workers: torch, the image stack and captioner's modules. Nothing
# here may import onnxruntime at import time (it starts a thread), or run a network (tests/test_workers.py).
PRELOAD = ["torch", "torchvision.transforms.v2", "PIL.Image", "numpy", "timm", "captioner.pipeline.batch",
           "captioner.pipeline.captioner", "captioner.training.data"]
WORKER_TIMEOUT = 300.0  # seconds a DataLoader may wait for the next batch before the command stops


# The light install's fork server: no torch to import (a module that is not installed is skipped by the server)
LIGHT_PRELOAD = ["PIL.Image", "numpy", "captioner.pipeline.batch", "captioner.lite.captioner"]


def context(preload: Sequence[str] | None = None) -> BaseContext:
    """The multiprocessing context for every worker process (DataLoader's multiprocessing_context); the fork
    server imports `preload` (default PRELOAD) when it starts: the first call's list is the one it keeps."""
    ctx = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(list(PRELOAD if preload is None else preload))
    return ctx


def quiet_handover(worker_id: int = 0) -> None:
    """A DataLoader worker's init: a batch whose hand-over the main process abandoned (Ctrl-C or SIGTERM while it
    received the batch's shared memory) is not an error. Python's resource sharer, the worker thread that passes
    the memory's descriptor, would print a traceback for the closed connection; other errors still print."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not issubclass(kind, (OSError, EOFError)):
            previous(kind, value, tb)

    sys.excepthook = hook


def start(preload: Sequence[str] | None = None) -> None:
    """Start the fork server now, so that its imports run while this process loads the model (it is started
    by exec, never forked from this process's runtimes; a later context() reuses it)."""
    if context(preload).get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


@contextlib.contextmanager
def loader_errors(what: str, timeout: float, done: Callable[[], str] | None = None) -> Iterator[None]:
    """A DataLoader's 'timed out' or 'worker exited unexpectedly' inside the block becomes one CaptionerError
    naming `what` (e.g. 'caption worker'); done() says what was kept."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        if "DataLoader timed out" in text:
            why = (f"no {what} finished a batch in {timeout:g} s: one hung or is far too slow "
                   "(try --workers 0, or a larger --worker-timeout)")
        elif "DataLoader worker" in text and ("exited unexpectedly" in text or "killed by signal" in text):
            why = f"a {what} died ({' '.join(text.split())[:200]}); try --workers 0"
        else:
            raise
        raise CaptionerError(why + (f"; {done()}" if done else "")) from None


_ITEMS: Any = None  # in a pool worker: the sequence its tasks index (sent once, by the initializer)


def _init_worker(items: Any) -> None:
    global _ITEMS
    _ITEMS = items
    setup = getattr(items, "setup_worker", None)  # e.g. one thread per worker, this worker's own decoders
    if setup is not None:
        setup()


def _item(i: int) -> Any:
    return _ITEMS[i]


def pooled(items: Any, n: int, workers: int, timeout: float, what: str, done: Callable[[], str] | None = None,
           preload: Sequence[str] | None = None) -> Iterator[Any]:
    """items[0], ..., items[n-1], in order: computed here when workers == 0, else by `workers` processes from the
    fork server, each sent `items` once (its `setup_worker()` runs there first), two tasks a worker in flight.
    No result within `timeout` s, or a worker that dies, is one CaptionerError naming `what` (done() says what
    was kept); the workers are killed on any early exit, so that nothing waits on a hung one."""
    if workers <= 0:
        for i in range(n):
            yield items[i]
        return
    pool = ProcessPoolExecutor(workers, mp_context=context(preload), initializer=_init_worker, initargs=(items,))
    finished = False
    try:
        queue: collections.deque = collections.deque()
        submitted = 0
        while submitted < n and len(queue) < 2 * workers:
            queue.append(pool.submit(_item, submitted))
            submitted += 1
        while queue:
            try:
                result = queue.popleft().result(timeout=timeout)
            except FutureTimeout:
                why = (f"no {what} finished a batch in {timeout:g} s: one hung or is far too slow "
                       "(try --workers 0, or a larger --worker-timeout)")
                raise CaptionerError(why + (f"; {done()}" if done else "")) from None
            except BrokenProcessPool as exc:
                why = f"a {what} died ({' '.join(str(exc).split())[:200]}); try --workers 0"
                raise CaptionerError(why + (f"; {done()}" if done else "")) from None
            if submitted < n:
                queue.append(pool.submit(_item, submitted))
                submitted += 1
            yield result
        finished = True
    finally:
        if not finished:  # an error, a timeout or the caller stopped early: nothing may wait on a hung worker
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.kill()
        pool.shutdown(wait=finished, cancel_futures=True)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one: a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def warn_if_more_than_cpus(workers: int) -> None:
    """One warning line when `workers` one-thread processes exceed the usable CPUs (torch's DataLoader says it in
    several lines, twice: its warning is silenced where we make one)."""
    cpus = usable_cpus()
    if workers > cpus:
        log.warning(f"captioner: warning: {workers} workers on {cpus} CPU{'s' if cpus != 1 else ''}: each worker "
                    f"runs one thread, so more than {cpus} is usually slower")
