"""Ctrl-C that never splits a training step in two.

An optimizer step changes the weights, the optimizer state, the schedule and the step counter; a KeyboardInterrupt
between any two of those leaves a state that no checkpoint describes (saving it and resuming applies the step
twice). `deferred_interrupt()` holds SIGINT back for the length of such a section and raises KeyboardInterrupt as
soon as it ends, so an interrupted run saves either the state before the step or the state after it.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Run the block to its end even if SIGINT arrives; then raise KeyboardInterrupt if one did.

    Outside the main thread (where Python delivers signals) this does nothing. A second Ctrl-C during the block is
    held back too: the section is short (an optimizer step), and finishing it is what keeps the checkpoint exact.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
