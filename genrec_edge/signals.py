"""Holding Ctrl-C and SIGTERM over a block that must not be cut in the middle."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def held_signals():
    """Hold Ctrl-C and SIGTERM until the block returns, then act on them as before.

    For a llama.cpp call (quantize.py: the only Python code that runs during it is the log callback, where
    ctypes prints and drops the KeyboardInterrupt a handler raises) and for renames that must all happen or
    none (bench/run.py's result files). The handlers before are called once the block is over. Only the main
    thread sets handlers: elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    held = [sig for sig, handler in previous.items() if handler not in (signal.SIG_IGN, None)]
    for sig in held:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig in held:
            signal.signal(sig, previous[sig])
    if caught:
        handler = previous[caught[0]]
        if callable(handler):
            handler(caught[0], None)  # KeyboardInterrupt, or the CLI's Stopped
        else:  # SIG_DFL
            signal.raise_signal(caught[0])
