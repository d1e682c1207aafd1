"""Torch work outside an engine's generation thread, in a thread that ends with it (see `in_passing_thread`)."""
from __future__ import annotations

import threading
from collections.abc import Callable


def in_passing_thread(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) in a new thread that ends with it; its result or its exception.

    libgomp keeps an OpenMP thread pool for every thread that ever ran a parallel region, and once the process holds
    more pool threads than CPUs it stops spinning them between regions: every parallel op then pays a futex wake-up.
    Model loading and cache allocation in the main thread left such a pool behind, and the continuous-batching
    thread's decode steps ran 1.4x slower (a (8, 576) x (576, 1536) linear: 155 -> 245 us, SmolLM2 on 2 cores). Torch
    work outside the generation thread goes through here, so its pool goes when the thread does."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = e

    thread = threading.Thread(target=run, name="prefixtune-setup", daemon=True)  # Ctrl-C still ends the process
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
