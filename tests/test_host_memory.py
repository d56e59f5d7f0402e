"""keep_freed_memory: memory freed and allocated again is not faulted in again (glibc), and the opt-out
leaves malloc as it is. Each case runs in a fresh interpreter (malloc's settings are per process)."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

# Hold 32 MiB in 2 MiB blocks (as a pipeline holds activations), free them, do it again: the page faults
# of the second round say whether the freed memory stayed mapped.
CYCLES = """
import resource, sys
from pipetrain.runtime.host_memory import keep_freed_memory

def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def cycle() -> int:
    start = faults()
    held = [bytearray(2 << 20) for _ in range(16)]
    for block in held:
        memoryview(block)[::4096] = b"\\x01" * 512  # touch every page
    del held
    return faults() - start

kept = keep_freed_memory()
cycle()
print(kept, cycle())
"""
PAGES = 32 * 2**20 // 4096


def _run(keep: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", CYCLES], capture_output=True, text=True, check=True,
                         env={**os.environ, "PIPETRAIN_KEEP_FREED_MEMORY": keep}).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_memory_is_reused_without_page_faults():
    kept, faults = _run("1")
    assert kept
    assert faults < PAGES // 20, f"{faults} page faults re-allocating {PAGES} pages"


def test_the_opt_out_leaves_glibcs_default_which_faults_again():
    kept, faults = _run("0")
    assert not kept
    assert faults > PAGES // 2  # (why a CPU stage sets it: see host_memory.py)
