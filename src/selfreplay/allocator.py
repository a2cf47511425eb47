"""Keep freed memory in the process instead of handing it back to the kernel after every step.

glibc's malloc serves blocks above a threshold (at most 32 MiB) with fresh ``mmap`` pages and returns a freed heap
top to the OS; a training step frees and re-allocates the same logits and activations every step, so each step
pays for page faults again (the en_es recipe's finetune, 25 steps of KL real replay on one thread: 2.6M minor
faults and 4.9 s in the kernel). Serving every block from the heap (no ``mmap``) and keeping up to 1 GiB of freed
heap top makes them stay for reuse: 0.37M faults, 1.0 s. Set once at start-up; users who set ``MALLOC_*``
variables themselves keep their settings; other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap top

_done = False


def keep_freed_memory() -> bool:
    """Tune glibc malloc for a training process (once; idempotent). Returns whether the settings were applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
