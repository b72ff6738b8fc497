"""Process-wide settings: a faster CPU allocator, and no notices about GPU-only parts.

PyTorch on CPU allocates and frees activation buffers of tens to hundreds of megabytes in
every step. glibc serves each of them with a fresh ``mmap`` and hands it back to the kernel
on ``free``, so the next step page-faults and zeroes the same memory again. On 2 cores that
kernel work took more time than the arithmetic: a LiteMedSAM 3D training step ran in 18.7 s
with glibc's defaults and 6.1 s with these settings (``python benchmarks/run.py --only
allocator``). The price is a higher resident peak, since freed memory stays in the process
for reuse (11.1 GB against 9.7 GB in that step).

``import medadapt`` applies it once; set ``MEDADAPT_MALLOC_TUNING=0`` to leave glibc's
defaults alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import warnings

ENV_VAR = "MEDADAPT_MALLOC_TUNING"
# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_applied: bool | None = None


def tune_cpu_allocator() -> bool:
    """Serve large allocations from the reusable heap and keep freed memory for reuse.

    Returns True if the settings are in effect (Linux with glibc, not disabled through
    ``MEDADAPT_MALLOC_TUNING=0``). Safe to call repeatedly; only the first call acts.
    """
    global _applied
    if _applied is None:
        _applied = False
        if os.environ.get(ENV_VAR, "1") != "0" and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
            except OSError:
                return False
            # No mmap for big blocks, never give the heap's free top back to the kernel, and
            # grow it by what is asked only (a padded top measured slower: 10 s against 8 s).
            _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) \
                and bool(libc.mallopt(_M_TOP_PAD, 0))
    return _applied


def quiet_gpu_only_notices() -> None:
    """Silence MONAI's notices that its GPU DICOM decoder (nvImageCodec) is missing.

    MONAI's ``LoadImage`` builds every reader it knows, and the GPU DICOM one logs a warning
    and raises a second one on each construction when there is no GPU decoder: two lines per
    transform pipeline that say nothing about the user's data. Other warnings are untouched.
    """
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin")
