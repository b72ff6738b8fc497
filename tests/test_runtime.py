"""The CPU allocator tuning applied by ``import medadapt``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocates a 64 MiB block as torch's CPU allocator does (posix_memalign), reports whether
# glibc served it with its own mmap (bit 1 of the chunk's size word, just before the
# block), and whether freeing it handed memory back to the kernel (the program break fell).
_CHILD = r"""
import ctypes
import medadapt, medadapt.runtime as runtime
libc = ctypes.CDLL("libc.so.6")
libc.free.argtypes = [ctypes.c_void_p]
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_ssize_t]
block = ctypes.c_void_p()
assert libc.posix_memalign(ctypes.byref(block), 64, ctypes.c_size_t(64 * 2**20)) == 0
size_word = ctypes.c_size_t.from_address(block.value - ctypes.sizeof(ctypes.c_size_t)).value
mmapped = bool(size_word & 2)
before = libc.sbrk(0)
libc.free(block)
print(runtime._applied, mmapped, libc.sbrk(0) < before)
"""


def _run(tuning: str) -> list[bool]:
    env = dict(os.environ, MEDADAPT_MALLOC_TUNING=tuning)
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, check=True)
    return [word == "True" for word in out.stdout.split()[-3:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_come_from_the_heap_and_stay_there():
    applied, mmapped, trimmed = _run("1")
    assert applied and not mmapped and not trimmed
    # glibc's defaults, kept with MEDADAPT_MALLOC_TUNING=0: a fresh mapping per block.
    applied, mmapped, _ = _run("0")
    assert not applied and mmapped


def test_loading_an_image_prints_no_gpu_decoder_notice(tmp_path):
    # MONAI's LoadImage builds its GPU DICOM reader too; without a GPU decoder it logs and warns.
    child = r"""
import sys, numpy as np, nibabel as nib
import medadapt
from monai.transforms import LoadImage
path = sys.argv[1] + "/volume.nii.gz"
nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), path)
LoadImage(image_only=True)(path)
print("loaded")
"""
    out = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True, encoding="utf-8", errors="replace", check=True)
    assert "loaded" in out.stdout
    assert "nvImageCodec" not in out.stdout + out.stderr
