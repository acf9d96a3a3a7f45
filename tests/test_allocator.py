import subprocess
import sys

import pytest

from zoo.training import allocator

# a fresh process: allocates, writes and frees a 64 MB block (above glibc's largest mmap threshold), then prints
# the page faults of doing it again
SECOND_BLOCK_FAULTS = """
import resource, sys
from zoo.training.allocator import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    sys.exit("not glibc")
def write_a_block():
    block = bytearray(64 << 20)
    block[::4096] = b"x" * (len(block) // 4096)
write_a_block()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
write_a_block()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_kept_memory_is_reused_without_page_faults(tmp_path):
    pages, faults = (64 << 20) // 4096, {}
    for mode in ("default", "keep"):
        run = subprocess.run([sys.executable, "-c", SECOND_BLOCK_FAULTS, mode], capture_output=True, text=True,
                             cwd=tmp_path)
        if run.stderr.strip() == "not glibc":
            pytest.skip("the C library is not glibc")
        assert run.returncode == 0, run.stderr
        faults[mode] = int(run.stdout)
    assert faults["default"] > pages / 2  # glibc's default: mapped afresh, every page faults again
    assert faults["keep"] < pages / 100


def test_no_change_off_glibc(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
