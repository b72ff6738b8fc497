"""Depthwise convolution with "same" padding for 2D and 3D maps, fast for large kernels.

``dwconv(x, weight)`` computes exactly what
``F.conv2d(x, weight, padding="same", groups=C)`` (or ``F.conv3d``) computes, forward and
backward, but picks per call among three implementations (see ``dwconv_impl``):

* ``"direct"``: torch's own convolution. Its oneDNN forward kernel is very fast for small
  kernels, so inference with kernels up to 13x13 stays there, as do 3x3 kernels.
* ``"fft"``: products of real FFTs, with a hand-written backward that reuses the
  forward's spectrum of ``x``. Its cost hardly depends on the kernel size, which is what a
  51x51 kernel needs: torch runs such a depthwise convolution at well under 1 GFLOP/s.
* ``"mixed"``: torch's forward and input gradient, FFTs for the weight gradient, which
  is the slow part of torch's depthwise backward even for 5x5 kernels.

The choice comes from the cost model in :func:`choose_path`. Kernels are first clipped to
the part that can ever touch the map (:func:`clip_kernel`), which is exact for odd and
even kernels alike.

While a graph is being recorded (``torch.jit.trace``, ``torch.export`` and the ONNX
exporter built on it, ``torch.compile``; see :func:`capturing_graph`) the paths are chosen
as for inference and the FFT path runs as plain torch operations (``dwconv_impl.fft_dwconv``):
a recorded graph cannot hold the Python autograd Functions, and an exported model needs
no backward. ``"mixed"`` is torch's convolution in the forward, so it records as ``"direct"``.

Under ``torch.autocast`` every path returns what torch's convolution would, a tensor in
the autocast dtype, with gradients in the dtypes of ``x`` and the kernel: the direct
convolutions run in the autocast dtype, the FFTs in fp32 (half-precision FFTs are slow or
unavailable for most lengths, and a 51x51 kernel sums thousands of products).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from medadapt.ops.dwconv_impl import (
    FFTDepthwiseConv,
    MixedDepthwiseConv,
    autocast_dtype,
    direct_dwconv,
    export_fft_sizes,
    fft_dwconv,
    fft_plan,
    fft_size,
    same_offsets,
    static_shape,
)

__all__ = ["dwconv", "dwconv_multi", "fold_kernels", "clip_kernel", "choose_path", "path_costs", "fft_size",
           "capturing_graph"]

PATHS = ("direct", "fft", "mixed")


# ---------------------------------------------------------------------------------------
# Geometry of "same" padding
# ---------------------------------------------------------------------------------------
def _clip_range(k: int, n: int) -> tuple[int, int]:
    """Taps ``[start, stop)`` of a length-``k`` kernel that can touch a length-``n`` axis."""
    left, _ = same_offsets(k)
    return max(0, left - (n - 1)), min(k, left + n)


def clip_kernel(weight: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Crop a kernel to the taps that can ever touch data; the convolution is unchanged.

    Output ``i`` reads input ``i + j - left`` through tap ``j``; with ``0 <= i, i + j - left < n``
    only taps ``left - (n - 1) <= j <= left + (n - 1)`` ever meet data, at most ``2 n - 1`` of
    them. The cropped kernel, odd or even originally, keeps its centre where torch's "same"
    padding puts it: when both ends are cut it has ``2 n - 1`` taps with ``n - 1`` before the
    centre, and an even kernel cut only at its high end (which has one more tap) ends up
    the same. The result is a view, so gradients flow back into the full kernel (and are
    zero on the taps that never touch data, as they must be).
    """
    kernel = static_shape(weight)[2:]
    ranges = [_clip_range(k, int(n)) for k, n in zip(kernel, spatial)]
    if all(start == 0 and stop == k for (start, stop), k in zip(ranges, kernel)):
        return weight   # nothing to cut: no view, no extra autograd node
    return weight[(slice(None), slice(None), *(slice(*r) for r in ranges))]


def fold_kernels(weights: list[torch.Tensor]) -> torch.Tensor:
    """Merge several depthwise kernels into one whose "same" convolution is their sum.

    Each kernel is zero-padded to the largest size along every axis so that its centre
    (as torch's "same" padding defines it) lands on the centre of the big kernel. For
    kernels of equal parity this is plain centre padding; for mixed parity the single
    odd leftover tap goes where "same" padding needs it, so the fold stays exact. Used by
    :func:`dwconv_multi` and to merge a Dual-Kernel Adapter's branches for inference.
    """
    if not weights:
        raise ValueError("fold_kernels needs at least one kernel")
    shapes = [static_shape(w) for w in weights]
    ndim = len(shapes[0])
    if ndim not in (4, 5) or any(len(shape) != ndim for shape in shapes):
        raise ValueError(
            "fold_kernels expects kernels shaped (C, 1, kh, kw) or (C, 1, kd, kh, kw), all with the same "
            f"number of dimensions; got {shapes}"
        )
    if any(shape[:2] != shapes[0][:2] for shape in shapes):
        raise ValueError(f"fold_kernels needs kernels with the same channels; got {shapes}")
    size = [max(shape[d] for shape in shapes) for d in range(2, ndim)]
    big = [same_offsets(k) for k in size]
    total = None
    for w, shape in zip(weights, shapes):
        pad = []
        # F.pad lists (low, high) pairs starting from the last axis.
        for d in reversed(range(2, ndim)):
            left, right = same_offsets(shape[d])
            big_left, big_right = big[d - 2]
            pad += [big_left - left, big_right - right]
        w = F.pad(w, pad) if any(pad) else w
        total = w if total is None else total + w
    return total


# ---------------------------------------------------------------------------------------
# Cost model
# ---------------------------------------------------------------------------------------
# Estimated nanoseconds of each path. The constants were fitted to single-thread CPU
# times on this project's 2-core AVX-512 machines (torch 2.14: oneDNN convolutions, MKL
# FFTs) with ``python -m medadapt.ops.dwconv_calibrate``; all paths parallelise over maps,
# so the comparison carries over to 2 threads (where torch's 3D weight gradient does not
# parallelise at all, so the FFT-based paths only gain).
#
# direct (torch) has regimes rather than one speed:
#   forward with oneDNN's depthwise kernels (2D up to 13 taps per axis, any 3D kernel in
#   channels-last):  outputs * (a + b * taps)
#   forward otherwise (2D kernels above 13 taps, a generic fallback):  MACs * c
#   backward:  MACs * d. The weight gradient dominates; it is fast only for 2D 3x3 and
#   falls off a cliff for huge 3D kernels.
# fft: every map's padded spectrum (``points`` in total) goes through about 2 transforms
#   forward and 5 forward + backward, plus products: points * (e + f / L), with L the
#   FFT length of the last (contiguous) axis, as short rows carry a fixed cost; each extra
#   tap on an untransformed axis adds product passes (t).
# mixed: direct forward, direct input gradient (a forward convolution too), and the FFT
#   weight gradient: 2 forward transforms and a correlation, points * (e_w + f_w / L).
# Each FFT-based path has a fixed cost for the kernel's spectrum and Python overhead, and
# is only picked when clearly faster than torch's own convolution (FFT_MARGIN): near the
# break-even point that is the safer choice.
_DIRECT_FWD_PER_OUTPUT = {2: (1.5, 0.025), 3: (2.5, 0.01)}     # (a, b)
_DIRECT_FAST_MAX_2D = 13
_DIRECT_FWD_SLOW_PER_MAC = 0.5                                 # c
_DIRECT_BWD_PER_MAC = {2: 1.0, 3: 0.55}                        # d
_DIRECT_BWD_PER_MAC_2D_3X3 = 0.4
_DIRECT_BWD_PER_MAC_3D_HUGE = 7.0                              # beyond 500 taps
_FFT_PER_POINT = {False: (4.1, 250.0, 1.0), True: (10.3, 600.0, 3.0)}   # (e, f, t): forward, both
_FFT_WGRAD_PER_POINT = (6.5, 150.0, 1.5)                                # (e_w, f_w, t)
_FFT_FIXED = {False: 100e3, True: 300e3}
FFT_MARGIN = 0.8


def _direct_forward_cost(x_shape: tuple[int, ...], kernel: tuple[int, ...]) -> float:
    nd, outputs, taps = len(kernel), math.prod(x_shape), math.prod(kernel)
    if nd == 3 or max(kernel) <= _DIRECT_FAST_MAX_2D:
        a, b = _DIRECT_FWD_PER_OUTPUT[nd]
        return outputs * (a + b * taps)
    return outputs * taps * _DIRECT_FWD_SLOW_PER_MAC


def _direct_cost(x_shape: tuple[int, ...], kernel: tuple[int, ...], grad: bool) -> float:
    cost = _direct_forward_cost(x_shape, kernel)
    if grad:
        taps = math.prod(kernel)
        if len(kernel) == 2:
            per_mac = _DIRECT_BWD_PER_MAC_2D_3X3 if max(kernel) <= 3 else _DIRECT_BWD_PER_MAC[2]
        else:
            per_mac = _DIRECT_BWD_PER_MAC_3D_HUGE if taps > 500 else _DIRECT_BWD_PER_MAC[3]
        cost += math.prod(x_shape) * taps * per_mac
    return cost


def _spectrum_cost(x_shape: tuple[int, ...], kernel: tuple[int, ...], per_point: tuple[float, float, float]) -> float:
    """``points * (e + f / L + t * extra taps)`` for the FFT plan of this shape."""
    spatial = tuple(x_shape[2:])
    axes, sizes = fft_plan(spatial, kernel)
    points = math.prod(x_shape[:2]) * math.prod(sizes) * math.prod(n for a, n in enumerate(spatial) if a not in axes)
    extra_taps = math.prod(k for a, k in enumerate(kernel) if a not in axes) - 1
    e, f, t = per_point
    return points * (e + f / sizes[-1] + t * extra_taps)


def _fft_cost(x_shape: tuple[int, ...], kernel: tuple[int, ...], grad: bool) -> float:
    return _spectrum_cost(x_shape, kernel, _FFT_PER_POINT[grad]) + _FFT_FIXED[grad]


def _mixed_cost(x_shape: tuple[int, ...], kernel: tuple[int, ...], grad: bool) -> float:
    forward = _direct_forward_cost(x_shape, kernel)
    if not grad:
        return forward
    return 2 * forward + _spectrum_cost(x_shape, kernel, _FFT_WGRAD_PER_POINT) + _FFT_FIXED[True]


def path_costs(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], requires_grad: bool = False) -> dict:
    """The cost model's estimate in nanoseconds per path (kernel clipped first)."""
    spatial = tuple(x_shape[2:])
    kernel = tuple(stop - start for start, stop in map(_clip_range, kernel_shape[2:], spatial))
    x_shape = tuple(x_shape)
    return {
        "direct": _direct_cost(x_shape, kernel, requires_grad),
        "fft": _fft_cost(x_shape, kernel, requires_grad),
        "mixed": _mixed_cost(x_shape, kernel, requires_grad),
    }


def choose_path(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], requires_grad: bool = False) -> str:
    """``"direct"``, ``"fft"`` or ``"mixed"``: whichever the cost model expects to be fastest.

    Arguments:
      x_shape: input shape, (B, C, H, W) or (B, C, D, H, W).
      kernel_shape: kernel shape, (C, 1, kh, kw) or (C, 1, kd, kh, kw); clipped here.
      requires_grad: whether a backward pass will follow. That changes the answer for
        small kernels: torch's forward is fast there, its weight gradient is not.
    """
    return _choose_path(tuple(x_shape), tuple(kernel_shape), bool(requires_grad))


@lru_cache(maxsize=4096)
def _choose_path(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], requires_grad: bool) -> str:
    # Cached: evaluating the model takes tens of microseconds, as much as a whole small
    # convolution, and a network calls it with the same few shapes over and over.
    if math.prod(b - a for a, b in map(_clip_range, kernel_shape[2:], x_shape[2:])) == 1:
        return "direct"
    costs = path_costs(x_shape, kernel_shape, requires_grad)
    best = min(("fft", "mixed"), key=costs.__getitem__)
    if not requires_grad and best == "mixed":   # without a backward, mixed is direct
        return "direct"
    return best if costs[best] < FFT_MARGIN * costs["direct"] else "direct"


def _run_path(x: torch.Tensor, weight: torch.Tensor, path: str, out_dtype: torch.dtype | None) -> torch.Tensor:
    """The convolution by ``path``; ``out_dtype`` is autocast's dtype, or None outside autocast."""
    if path == "direct":
        if out_dtype is not None:
            x, weight = x.to(out_dtype), weight.to(out_dtype)
        return direct_dwconv(x, weight)
    axes, sizes = fft_plan(tuple(x.shape[2:]), tuple(weight.shape[2:]))
    if not axes:   # a 1x1(x1) kernel: a per-channel scale
        if out_dtype is not None:
            x, weight = x.to(out_dtype), weight.to(out_dtype)
        return x * weight.reshape(1, -1, *([1] * (x.ndim - 2)))
    function = FFTDepthwiseConv if path == "fft" else MixedDepthwiseConv
    return function.apply(x, weight, axes, sizes, out_dtype or x.dtype)


def _run_path_captured(x: torch.Tensor, weight: torch.Tensor, path: str,
                       out_dtype: torch.dtype | None) -> torch.Tensor:
    """:func:`_run_path` in plain torch operations, for a graph being recorded."""
    sizes = export_fft_sizes(static_shape(x)[2:], static_shape(weight)[2:])
    if path != "fft" or not any(sizes):   # "mixed" forwards by torch's convolution; 1x1 kernels are a scale
        return _run_path(x, weight, "direct", out_dtype)
    return fft_dwconv(x, weight, sizes).to(out_dtype or x.dtype)


def capturing_graph() -> bool:
    """Whether the current call is being recorded into a graph rather than run: under
    ``torch.jit.trace``, ``torch.export`` (which ``torch.onnx.export`` uses) or ``torch.compile``."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()


# ---------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------
def _check(x: torch.Tensor, weight: torch.Tensor, name: str = "dwconv") -> None:
    x_shape, w_shape = static_shape(x), static_shape(weight)
    if x.ndim not in (4, 5):
        raise ValueError(
            f"{name} expects a 2D map (B, C, H, W) or a 3D map (B, C, D, H, W); got shape {x_shape}"
        )
    if weight.ndim != x.ndim:
        raise ValueError(
            f"{name} kernel must have {x.ndim} dimensions (C, 1, {'kh, kw' if x.ndim == 4 else 'kd, kh, kw'}) "
            f"for input {x_shape}; got {w_shape}"
        )
    if w_shape[0] != x_shape[1] or w_shape[1] != 1:
        raise ValueError(
            f"{name} kernel {w_shape} is not depthwise for {x_shape[1]} channels: "
            f"expected ({x_shape[1]}, 1, ...)"
        )
    if 0 in w_shape[2:]:
        raise ValueError(f"{name} kernel has an empty spatial axis: {w_shape}")


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def dwconv(x: torch.Tensor, weight: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """Depthwise convolution, stride 1, "same" padding (as torch defines it, also for even kernels).

    Arguments:
      x: (B, C, H, W) or (B, C, D, H, W).
      weight: (C, 1, kh, kw) or (C, 1, kd, kh, kw); may be larger than the map.
      path: force an implementation: ``"direct"`` (torch's convolution), ``"fft"`` (FFTs
        for the output and both gradients) or ``"mixed"`` (torch's convolution for the
        output and the input gradient, FFTs for the weight gradient). By default
        :func:`choose_path` decides from the shapes and whether gradients are needed.

    Returns:
      A tensor shaped like ``x``, in ``x``'s dtype, or in the autocast dtype inside
      ``torch.autocast`` (as torch's convolution). Gradients reach ``x`` and ``weight`` on
      every path, in their own dtypes; second derivatives only on the direct one (the
      FFT-based backward passes are written by hand). While a graph is recorded
      (:func:`capturing_graph`) the FFT path is plain torch code, differentiable as such.
    """
    _check(x, weight)
    if path is not None and path not in PATHS:
        raise ValueError(f"dwconv path must be one of {PATHS} or None; got {path!r}")
    captured = capturing_graph()
    # A recorded graph is for inference (its paths are the inference ones) and holds no
    # Python autograd Function: the FFT path then runs as plain torch operations.
    requires_grad = False if captured else _needs_grad(x, weight)
    x_shape = static_shape(x)
    if captured:
        # torch.export keeps the batch size symbolic (a dynamic batch axis), and the plan is
        # cached by shape; every path computes the same for any batch, so plan for one image.
        x_shape = (1, *x_shape[1:])
    clip, path = _dispatch(x_shape, static_shape(weight), requires_grad, path)
    if clip is not None:
        weight = weight[clip]
    run = _run_path_captured if captured else _run_path
    out_dtype = autocast_dtype(x)
    if out_dtype is None:
        return run(x, weight, path, None)
    # Each path casts for itself: autocast inside would cast the convolutions' inputs but
    # not the kernels the hand-written backward passes hand to them, nor keep FFTs in fp32.
    with torch.autocast(x.device.type, enabled=False):
        return run(x, weight, path, out_dtype)


@lru_cache(maxsize=4096)
def _dispatch(x_shape, kernel_shape, requires_grad, path):
    """(index that clips the kernel, or None; path), worked out once per shape.

    With 3x3 kernels torch's convolution takes well under a millisecond, so the wrapper's
    own Python time shows; caching keeps it to a few microseconds.
    """
    ranges = [_clip_range(k, n) for k, n in zip(kernel_shape[2:], x_shape[2:])]
    clip = None
    if any(start > 0 or stop < k for (start, stop), k in zip(ranges, kernel_shape[2:])):
        clip = (slice(None), slice(None), *(slice(*r) for r in ranges))
    clipped = (*kernel_shape[:2], *(stop - start for start, stop in ranges))
    return clip, path or _choose_path(x_shape, clipped, requires_grad)


def dwconv_multi(x: torch.Tensor, weights: list[torch.Tensor], path: str | None = None) -> torch.Tensor:
    """Sum of the "same" depthwise convolutions of ``x`` with several kernels.

    Convolution is linear in the kernel, so the sum equals one convolution with the
    kernels folded into one (:func:`fold_kernels`): ``x`` is transformed once whatever the
    number of kernels, and autograd carries the folded kernel's gradient back to every
    kernel through the zero padding. Kernels are clipped to the map first, so a huge
    kernel never makes the fold bigger than the map needs.
    """
    if isinstance(weights, torch.Tensor) or not weights:
        raise ValueError("dwconv_multi expects a non-empty list of kernels")
    for w in weights:
        _check(x, w, name="dwconv_multi")
    spatial = static_shape(x)[2:]
    return dwconv(x, fold_kernels([clip_kernel(w, spatial) for w in weights]), path=path)
