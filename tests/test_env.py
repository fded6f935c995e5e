"""utils.env.keep_freed_memory: large blocks come from malloc's heap (reused), not from a fresh mmap."""

import ctypes
import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes
import torch
from truedepth.utils.env import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory()
before = libc.mallinfo2().hblks  # blocks mmapped so far (importing torch made some)
x = torch.empty(64 * 2**20, dtype=torch.uint8)  # 64 MB: over glibc's largest mmap threshold (32 MB)
print(applied, libc.mallinfo2().hblks - before)
"""


def _start_probe(env_value: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRUEDEPTH_MALLOC"}
    if env_value is not None:
        env["TRUEDEPTH_MALLOC"] = env_value
    return subprocess.Popen(
        [sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _probe_result(proc: subprocess.Popen) -> tuple[str, int]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    applied, mapped = out.split()
    return applied, int(mapped)  # blocks the 64 MB tensor added to the mmapped ones


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_large_blocks_come_from_the_heap_not_mmap():
    try:
        assert ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    default, opt_out = _start_probe(None), _start_probe("system")  # two processes at once: each imports torch
    assert _probe_result(default) == ("True", 0)
    applied, mapped = _probe_result(opt_out)  # the opt-out leaves glibc's default: a 64 MB block is mmapped
    assert applied == "False" and mapped >= 1
