"""The cyclic garbage collector paused around work that creates hundreds of thousands of long-lived objects
(importing torch and transformers, building a model): each collection would traverse them all again, about a
fifth of that work's CPU time. Garbage made meanwhile is collected afterwards as usual."""
from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def paused():
    """The collector off inside; on again on exit (also on an error) if it was on before."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
