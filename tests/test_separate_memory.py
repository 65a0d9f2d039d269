"""`marsctl separate`'s memory setting: large freed buffers go back to the system (glibc only)."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

SCRIPT = r"""
import sys
import numpy as np

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "on":
    from marsctl.separate.api import return_large_buffers_to_the_system
    assert return_large_buffers_to_the_system()
np.ones(512 * 1024)  # one 4 MiB buffer freed: by default glibc now serves such sizes from its heap
base = rss_mib()
keep, large = [], []
for i in range(40):  # 4 MiB buffers with small long-lived ones in between (as a model's activations and its bookkeeping)
    large.append(np.ones(512 * 1024))
    keep.append(np.ones(2000))
del large
print(rss_mib() - base)
"""


def _held_after_free(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_large_buffers_are_given_back_to_the_system():
    try:
        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    default = _held_after_free("off")
    setting = _held_after_free("on")
    # by default glibc keeps most of the 160 MiB on its heap after the first buffer is freed
    assert default > 100, default
    assert setting < 20, setting
