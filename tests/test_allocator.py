"""The allocator setting: freed blocks stay in the process, so a loop that frees and re-allocates the same large
buffer (as every training step does with its logits) stops paying page faults for it."""

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import torch
if sys.argv[1] == "tuned":
    from selfreplay.allocator import keep_freed_memory
    assert keep_freed_memory()
for _ in range(3):
    torch.ones(16 << 20)  # 64 MiB: above glibc's largest mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(16 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env) -> int:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=environ,
                         check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    default, tuned = _faults("default"), _faults("tuned")
    assert default > 20 * 10_000  # each 64 MiB block is 16k fresh pages by default
    assert tuned < default / 2.5  # measured 4x fewer (82k vs 328k); on a training step 7x (docs/benchmarks)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_users_own_malloc_settings_are_kept():
    code = "from selfreplay.allocator import keep_freed_memory; print(keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | {"MALLOC_ARENA_MAX": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"
