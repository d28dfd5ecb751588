"""Worker processes that never inherit a live native runtime.

ONNX Runtime sessions, oneDNN/OpenMP pools and a compiled encoder hold threads; a fork() copies the memory but
not the threads, so the child can wait forever on a lock or condition that a thread it does not have was
holding (issue 23: a forked caption worker hung in onnxruntime's session destructor). Every process of ours
that runs a network therefore starts from the `forkserver`: a fresh interpreter (fork + exec) that imports
PRELOAD and nothing that starts a runtime, then forks the workers. Each worker makes its own sessions and pools
after it starts. Its imports are paid once per command, and can overlap the model's loading (`start`).

`loader_errors` turns a DataLoader that waits too long, or a worker that dies, into one CaptionerError (exit 1).
"""

from __future__ import annotations

import contextlib
import multiprocessing
from multiprocessing.context import BaseContext
from typing import Callable, Iterator

from ..errors import CaptionerError

# spawn where there is no fork server (Windows): also a fresh interpreter, slower to start
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
# What the fork server imports before it forks workers: torch, the image stack and captioner's modules. Nothing
# here may import onnxruntime at import time (it starts a thread), or run a network (tests/test_workers.py).
PRELOAD = ["torch", "torchvision.transforms.v2", "PIL.Image", "numpy", "timm", "captioner.pipeline.batch",
           "captioner.pipeline.captioner", "captioner.training.data"]
WORKER_TIMEOUT = 300.0  # seconds a DataLoader may wait for the next batch before the command stops


def context() -> BaseContext:
    """The multiprocessing context for every worker process (DataLoader's multiprocessing_context)."""
    ctx = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start() -> None:
    """Start the fork server now, so that its imports run while this process loads the model (it is started
    by exec, never forked from this process's runtimes; a later context() reuses it)."""
    if context().get_start_method() == "forkserver":
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
