"""Implementations behind :func:`medadapt.ops.dwconv.dwconv`.

Three ways to compute a "same" depthwise convolution and its gradients:

* :func:`direct_dwconv`: torch's own convolution (oneDNN);
* :class:`FFTDepthwiseConv`: real FFTs for the output and both gradients;
* :class:`MixedDepthwiseConv`: torch's convolution for the output and the input gradient
  (its forward kernel is fast for small kernels), FFTs for the weight gradient (torch's
  depthwise weight gradient is the slow part, 5-30x slower than its forward);
* :func:`fft_dwconv`: the FFT convolution as plain torch operations, for graph capture
  (``torch.jit.trace``, ``torch.export``, ONNX export) and TorchScript: the autograd
  Functions above are Python code a recorded graph cannot hold.

``dwconv`` clips the kernel first and picks one by its cost model. Conventions: ``x`` is
(B, C, *spatial), the kernel (C, 1, *kernel) with every kernel axis at most ``2 n - 1``
long, and "same" means torch's definition, ``y[i] = sum_j w[j] x[i + j - left]`` with
``left = (k - 1) // 2``.

In the FFT computations, axes with a long kernel are transformed. Axes with a short
kernel (at most ``DIRECT_MAX_TAPS`` taps, e.g. the depth axis of a 3x51x51 kernel) are
not: their few taps are applied between spectra as shifted products, which avoids
zero-padding that axis and running FFT passes along it (short FFTs along a strided axis
are slow).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from functools import lru_cache
from typing import Iterator, List

import torch
import torch.nn.functional as F

# Spectra are processed in blocks of maps whose spectrum takes about this many bytes per
# thread, so that transform, product and inverse transform of a block run while it is
# still in the per-core L2 cache (2 MiB here; torch splits each block's work across its
# threads). Transforming a whole (B, C) batch at once was up to 2x slower for large maps
# (2D with 192 channels, 3D volumes), where spectra reach tens of MiB and every FFT pass
# streams them through memory; 0.5 to 2 MiB per thread were equally good, and bigger
# blocks mean fewer operations.
BLOCK_BYTES_PER_THREAD = 1 << 20

# Axes whose kernel has at most this many taps are convolved between spectra instead of
# transformed, as long as another axis is transformed. With 3 taps that costs three
# products where a transform would pad e.g. 8 slices to 10 or 12 and add two FFT passes.
DIRECT_MAX_TAPS = 3


def same_offsets(k: int) -> tuple[int, int]:
    """Taps before and after the centre tap under torch's "same" padding.

    torch pads ``(k - 1) // 2`` on the low side and the rest on the high side, so an even
    kernel has one more tap after its centre than before it.
    """
    left = (k - 1) // 2
    return left, k - 1 - left


# ---------------------------------------------------------------------------------------
# FFT lengths and plans
# ---------------------------------------------------------------------------------------
def _length_cost(n: int) -> float:
    """Relative time of transforming one length-``n`` axis (per row), or inf if not 7-smooth.

    Fitted to 2D real transform timings with torch's MKL backend on this machine, which are
    about 2.4 ns per point for lengths 2^a 3^b and grow to about 3.5 with factors 5 or 7
    and 6 or more for odd lengths (the halved last axis of a real FFT wants even lengths);
    short rows also carry a fixed cost, about 30 ns.
    """
    rest, has_5_7 = n, False
    for p in (2, 3, 5, 7):
        while rest % p == 0:
            rest //= p
            has_5_7 |= p > 3
    if rest != 1:
        return math.inf
    per_point = 2.4 * (1.45 if has_5_7 else 1.0) * (2.5 if n % 2 else 1.0)
    return n * per_point + 30.0


@lru_cache(maxsize=None)
def fft_size(n: int) -> int:
    """The fastest FFT length ``>= n`` by :func:`_length_cost` (searched up to ``2 n``).

    Not simply the next 7-smooth number: with MKL, 96 beats 90 and 72 beats 70.
    """
    if n <= 2:
        return max(n, 1)
    return min(range(n, 2 * n + 1), key=_length_cost)


def fft_plan(spatial: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Spatial axes the FFT path transforms, and their FFT lengths.

    Circular convolution of length ``L`` equals the zero-padded "same" convolution along an
    axis as long as no tap wraps onto data: ``L >= n + max(left, right)``, which is less
    than the ``n + k - 1`` of a full linear convolution. Axes with at most
    ``DIRECT_MAX_TAPS`` taps are left untransformed when a longer axis is transformed.
    """
    long_axes = [a for a, k in enumerate(kernel) if k > DIRECT_MAX_TAPS]
    axes = long_axes or [a for a, k in enumerate(kernel) if k > 1]
    sizes = [fft_size(spatial[a] + max(same_offsets(kernel[a]))) for a in axes]
    return tuple(axes), tuple(sizes)


# ---------------------------------------------------------------------------------------
# Direct (torch) convolution
# ---------------------------------------------------------------------------------------
def static_shape(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s shape as Python ints. Under ``torch.jit.trace`` sizes are traced tensors; the
    plan (path, clipping, padding, FFT lengths) is meant to be fixed at the traced shape, so
    they are read as ints, without the tracer's warning about exactly that."""
    if not torch.jit.is_tracing():
        return tuple(t.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return tuple(int(n) for n in t.shape)


def direct_dwconv(x: torch.Tensor, weight: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """torch's depthwise convolution with "same" padding, spelled out for even kernels.

    ``flip=True`` convolves with the flipped kernel and mirrored padding instead, which
    is the adjoint in ``x``: the input gradient of a "same" convolution.
    """
    kernel = static_shape(weight)
    padding, pad = _direct_padding(kernel[2:], flip)
    if flip:
        weight = weight.flip(list(range(2, weight.ndim)))
    if pad is not None:
        # Pad explicitly (torch's padding="same" would make the same padded copy, and warn).
        x = F.pad(x, pad)
    if x.ndim == 4:
        return F.conv2d(x, weight, padding=padding, groups=kernel[0])
    # 3D: oneDNN's depthwise kernels want channels-last data. Converting there and back
    # costs two copies but makes forward+backward 3-4x faster (forward about 1.3x).
    # (In 2D the same trick loses for 3x3 kernels and for many channels, so 2D stays put.)
    fmt = torch.channels_last_3d
    y = F.conv3d(x.contiguous(memory_format=fmt), weight.contiguous(memory_format=fmt), padding=padding, groups=kernel[0])
    return y.contiguous()


@lru_cache(maxsize=1024)
def _direct_padding(kernel: tuple[int, ...], flip: bool):
    """(padding argument of the convolution, explicit F.pad list or None) for "same"."""
    offsets = [same_offsets(k) for k in kernel]
    if flip:
        offsets = [(right, left) for left, right in offsets]
    if all(left == right for left, right in offsets):
        return [left for left, _ in offsets], None
    return 0, [p for pair in reversed(offsets) for p in pair]


# ---------------------------------------------------------------------------------------
# FFT convolution as plain operations (graph capture and TorchScript)
# ---------------------------------------------------------------------------------------
def export_fft_sizes(spatial: tuple[int, ...], kernel: tuple[int, ...]) -> list[int]:
    """FFT length per spatial axis for :func:`fft_dwconv`, 0 where the kernel has one tap.

    Every axis with more than one tap is transformed (no shifted products between spectra),
    which keeps the recorded graph to one transform, one product and one inverse.
    """
    return [fft_size(n + max(same_offsets(k))) if k > 1 else 0 for n, k in zip(spatial, kernel)]


def fft_dwconv(x: torch.Tensor, weight: torch.Tensor, sizes: List[int]) -> torch.Tensor:
    """"Same" depthwise convolution by real FFTs in plain torch operations.

    The forward of :class:`FFTDepthwiseConv` without its blocks, kept spectra and
    untransformed axes: ``irfftn(rfftn(x) * rfftn(flip(w)))`` cut to the "same" window, in
    fp32 (fp64 for fp64 input). It records as a handful of ``fft_rfftn`` / ``fft_irfftn``
    nodes, so traced, exported (ONNX's DFT) and scripted graphs can hold it, and it works
    for any batch size. Autograd differentiates it like any torch code; training uses the
    faster hand-written backward of the autograd Functions instead.

    Arguments:
      x: (B, C, *spatial).
      weight: (C, 1, *kernel), every kernel axis at most ``2 n - 1`` long (see ``clip_kernel``).
      sizes: FFT length per spatial axis, at least ``n + max(left, right)``; 0 for an axis
        where the kernel has a single tap (see :func:`export_fft_sizes`).

    Returns the result in the compute dtype (fp32 or fp64); the caller casts.
    """
    dims: List[int] = []
    kdims: List[int] = []
    lengths: List[int] = []
    for a in range(x.dim() - 2):
        if sizes[a] > 0:
            dims.append(2 + a)
            kdims.append(1 + a)
            lengths.append(sizes[a])
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    kernel_shape: List[int] = [weight.shape[0]]
    for a in range(2, weight.dim()):
        kernel_shape.append(weight.shape[a])
    # Torch's convolution is a cross-correlation: a circular convolution with the flipped
    # kernel, read from offset ``right`` on (exact while no tap wraps onto data).
    g = weight.reshape(kernel_shape).to(compute).flip(kdims)
    spectrum = torch.fft.rfftn(x.to(compute), s=lengths, dim=dims) * torch.fft.rfftn(g, s=lengths, dim=kdims)
    z = torch.fft.irfftn(spectrum, s=lengths, dim=dims)
    for d in dims:
        k = weight.shape[d]
        z = z.narrow(d, k - 1 - (k - 1) // 2, x.shape[d])
    return z


# ---------------------------------------------------------------------------------------
# FFT machinery
# ---------------------------------------------------------------------------------------
def _blocks(batch: int, channels: int, per_block: int) -> Iterator[tuple[slice, slice, bool]]:
    """(batch slice, channel slice, last block of this channel slice) covering all maps.

    Blocks hold whole samples when a block can take all channels; otherwise they hold a
    channel range of one sample, iterated channel range first so that per-channel data
    (the kernel spectrum, the weight gradient's accumulator) stays hot across the batch.
    """
    if per_block >= channels:
        step = per_block // channels
        for b0 in range(0, batch, step):
            yield slice(b0, b0 + step), slice(None), b0 + step >= batch
    else:
        for c0 in range(0, channels, per_block):
            for b in range(batch):
                yield slice(b, b + 1), slice(c0, c0 + per_block), b == batch - 1


def _inverse(spec: torch.Tensor, dims: tuple[int, ...], sizes: tuple[int, ...], windows) -> torch.Tensor:
    """Inverse real FFT over ``dims``, computing only the ``(start, length)`` window per axis.

    Axes are inverted one at a time and cut right away, so later passes run on fewer rows:
    faster than ``irfftn`` followed by a crop.
    """
    for d, size, (start, length) in zip(dims[:-1], sizes[:-1], windows[:-1]):
        spec = torch.fft.ifft(spec, n=size, dim=d).narrow(d, start, length)
    start, length = windows[-1]
    return torch.fft.irfft(spec, n=sizes[-1], dim=dims[-1]).narrow(dims[-1], start, length)


def _direct_terms(spatial, kernel, axes):
    """Shifted products that apply the taps of untransformed axes between spectra.

    One term per combination of taps on the untransformed axes: (tap index per such axis,
    output range, input range), so that ``Y[out] += X[in] * G[tap]``. The centre tap comes
    first: it covers every output, so it initialises ``Y`` without a zero fill.
    """
    direct = [a for a in range(len(kernel)) if a not in axes]
    per_axis = []
    for a in direct:
        n, k = spatial[a], kernel[a]
        left = same_offsets(k)[0]
        options = []
        for j in [left] + [j for j in range(k) if j != left]:
            lo, hi = max(0, left - j), min(n, n + left - j)
            if lo < hi:
                options.append((j, (lo, hi), (lo + j - left, hi + j - left)))
        per_axis.append(options)
    terms = [tuple(zip(*combo)) or ((), (), ()) for combo in itertools.product(*per_axis)]
    return direct, terms


def _narrow(t: torch.Tensor, lead: int, direct, ranges) -> torch.Tensor:
    """``t`` restricted to ``ranges`` along the untransformed axes (after ``lead`` dims)."""
    for a, (lo, hi) in zip(direct, ranges):
        t = t.narrow(lead + a, lo, hi - lo)
    return t


def _tap(spec_k: torch.Tensor, direct, taps) -> torch.Tensor:
    """The kernel spectrum (C, ...) of one tap combination on the untransformed axes."""
    for a, j in zip(direct, taps):
        spec_k = spec_k.narrow(1 + a, j, 1)
    return spec_k


def _apply_taps(spec_x, spec_k, direct, terms, inplace=False):
    """``Y = sum_taps shift(X) G[tap]``: the forward product, with untransformed axes.

    ``inplace`` allows overwriting ``X`` (only taken up when there is a single tap, as the
    shifted products need the original): fresh buffers cost page faults here.
    """
    (taps0, _, _), rest = terms[0], terms[1:]
    if inplace and not rest:
        return spec_x.mul_(_tap(spec_k, direct, taps0))
    spec_y = spec_x * _tap(spec_k, direct, taps0)
    for taps, out, src in rest:
        _narrow(spec_y, 2, direct, out).addcmul_(_narrow(spec_x, 2, direct, src), _tap(spec_k, direct, taps))
    return spec_y


def _apply_taps_transposed(spec_g, spec_k_conj, direct, terms, inplace=False):
    """The adjoint of :func:`_apply_taps` in ``X``: ``dX = sum_taps shift^T(dY) conj(G[tap])``."""
    (taps0, _, _), rest = terms[0], terms[1:]
    if inplace and not rest:
        return spec_g.mul_(_tap(spec_k_conj, direct, taps0))
    spec_gx = spec_g * _tap(spec_k_conj, direct, taps0)
    for taps, out, src in rest:
        _narrow(spec_gx, 2, direct, src).addcmul_(_narrow(spec_g, 2, direct, out), _tap(spec_k_conj, direct, taps))
    return spec_gx


def _tap_correlations(spec_g, spec_x_conj, direct, terms, kernel):
    """Per channel and tap of the untransformed axes: ``sum_{batch, positions} dY conj(X)``.

    Returns (C, ...): one entry per tap along untransformed axes, the spectrum of the
    weight gradient along transformed ones.
    """
    reduce = (0,) + tuple(2 + a for a in direct)
    if len(terms) == 1:   # a single tap on every untransformed axis
        return _sum_dims(spec_g * spec_x_conj, reduce)[0]
    shape = list(spec_g.shape[1:])
    for a in direct:
        shape[1 + a] = kernel[a]
    out = spec_g.new_zeros(shape)
    for taps, dst, src in terms:
        prod = _narrow(spec_g, 2, direct, dst) * _narrow(spec_x_conj, 2, direct, src)
        _tap(out, direct, taps).copy_(_sum_dims(prod, reduce)[0])
    return out


def _sum_dims(t: torch.Tensor, dims) -> torch.Tensor:
    """``t.sum(dims, keepdim=True)``, one dim at a time from the innermost.

    torch's reduction over several non-adjacent dims (batch and depth here) runs about 4x
    slower than the same reductions done one after the other.
    """
    for d in sorted(dims, reverse=True):
        t = t.sum(dim=d, keepdim=True)
    return t


def _maps_per_block(map_bytes: int) -> int:
    """How many maps' spectra make one block (see BLOCK_BYTES_PER_THREAD)."""
    return max(1, BLOCK_BYTES_PER_THREAD * min(torch.get_num_threads(), 4) // map_bytes)


class _Plan:
    """Shapes and index bookkeeping of one FFT convolution, shared by forward and backward."""

    def __init__(self, x_shape, kernel, axes, sizes, per_block):
        self.batch, self.channels, *spatial = x_shape
        self.spatial, self.kernel = tuple(spatial), tuple(kernel)
        self.axes, self.sizes = axes, sizes
        self.dims = tuple(2 + a for a in axes)          # transformed dims of x
        self.kdims = tuple(1 + a for a in axes)         # ... of the kernel viewed as (C, *kernel)
        self.direct, self.terms = _direct_terms(self.spatial, self.kernel, axes)
        spec = list(x_shape)
        for d, size in zip(self.dims, sizes):
            spec[d] = size
        spec[self.dims[-1]] = sizes[-1] // 2 + 1
        self.spec_shape = tuple(spec)
        self.per_block = per_block
        # Output window of z = x (*) g, and the zero padding that puts dY at offset
        # ``right`` in an FFT-length buffer (F.pad lists (low, high) from the last axis).
        self.y_window = tuple((same_offsets(self.kernel[a])[1], self.spatial[a]) for a in axes)
        self.x_window = tuple((0, self.spatial[a]) for a in axes)
        self.w_window = tuple((0, self.kernel[a]) for a in axes)
        pad = []
        for a in reversed(range(len(self.spatial))):
            if a in axes:
                right = same_offsets(self.kernel[a])[1]
                pad += [right, sizes[axes.index(a)] - right - self.spatial[a]]
            else:
                pad += [0, 0]
        self.dz_pad = tuple(pad)

    def blocks(self):
        return _blocks(self.batch, self.channels, self.per_block)

    def kernel_spectrum(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``G``: spectrum of the kernel flipped along the transformed axes, (C, ...)."""
        g = weight.reshape(self.channels, *self.kernel).to(dtype).flip(self.kdims)
        return torch.fft.rfftn(g, s=self.sizes, dim=self.kdims)


def _plan(x_shape, kernel, axes, sizes, complex_itemsize, device: torch.device) -> _Plan:
    if device.type != "cpu":
        # Blocks are about CPU caches; on a GPU each block only adds kernel launches.
        return _cached_plan(x_shape, kernel, axes, sizes, x_shape[0] * x_shape[1])
    spatial = list(x_shape[2:])
    for a, size in zip(axes, sizes):
        spatial[a] = size
    spatial[axes[-1]] = sizes[-1] // 2 + 1
    per_block = _maps_per_block(complex_itemsize * math.prod(spatial))   # depends on threads
    return _cached_plan(x_shape, kernel, axes, sizes, per_block)


@lru_cache(maxsize=256)
def _cached_plan(x_shape, kernel, axes, sizes, per_block) -> _Plan:
    # Plans are read-only; building one costs as much Python time as a small transform.
    return _Plan(x_shape, kernel, axes, sizes, per_block)


def _fft_backward(plan: _Plan, grad_y, need_x, need_w, spec_g_conj=None, spec_x_all=None, x=None):
    """Gradients by FFT: ``dx`` (needs ``conj(G)``) and/or ``dw`` (from ``X`` or from ``x``).

    With ``dz`` the output gradient shifted by ``right``: ``dx = irfft(dZ conj(G))[:n]``
    and ``dg = irfft(sum_batch dZ conj(X))[:k]``, flipped back into ``dw``.
    """
    grad_x = torch.empty_like(grad_y) if need_x else None
    grad_w = grad_y.new_empty(plan.channels, *plan.kernel) if need_w else None
    cross = None
    for bs, cs, last in plan.blocks():
        spec_dz = torch.fft.rfftn(F.pad(grad_y[bs, cs], plan.dz_pad), dim=plan.dims)
        if need_w:
            if spec_x_all is not None:
                spec_x_conj = torch.conj_physical(spec_x_all[bs, cs])
            else:
                spec_x_conj = torch.fft.rfftn(x[bs, cs], s=plan.sizes, dim=plan.dims).conj_physical_()
            # Sum over the batch and over the positions along untransformed axes of
            # dZ conj(X), per tap of those axes; inverted once per channel.
            part = _tap_correlations(spec_dz, spec_x_conj, plan.direct, plan.terms, plan.kernel)
            cross = part if cross is None else cross.add_(part)
            if last:
                grad_w[cs] = _inverse(cross, plan.kdims, plan.sizes, plan.w_window).flip(plan.kdims)
                cross = None
        if need_x:
            # Last use of dZ: the product may overwrite it.
            spec_gx = _apply_taps_transposed(spec_dz, spec_g_conj[cs], plan.direct, plan.terms, inplace=True)
            grad_x[bs, cs] = _inverse(spec_gx, plan.dims, plan.sizes, plan.x_window)
    if grad_w is not None:
        grad_w = grad_w.reshape(plan.channels, 1, *plan.kernel)
    return grad_x, grad_w


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision has no CPU FFT, and cuFFT takes it for power-of-two lengths only (and
    # loses accuracy on long sums): transform in fp32 and round the results.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ---------------------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------------------
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)   # autocast leaves float64 alone


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs a convolution of ``x`` in, or None where autocast is off.

    Convolutions are on autocast's lower-precision list (CPU and CUDA alike), so under
    ``torch.autocast`` the result of ``dwconv`` is in the autocast dtype whatever the path.
    """
    device = x.device.type
    if x.dtype not in _AUTOCAST_ELIGIBLE or not torch.amp.is_autocast_available(device):
        return None
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def autocast_off(device_type: str):
    """A context without autocast on ``device_type``: the paths here cast for themselves
    (FFTs in fp32, convolutions in the caller's dtype), and autocast inside them would cast
    a convolution's input but not the kernel handed to it by hand."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _complex_itemsize(dtype: torch.dtype) -> int:
    return 16 if dtype == torch.float64 else 8


class FFTDepthwiseConv(torch.autograd.Function):
    """"Same" depthwise convolution by real FFTs; its backward uses FFTs too.

    Along each transformed axis (FFT length ``L``) torch's cross-correlation is computed
    as a circular convolution with the flipped kernel ``g``: ``z = x (*) g``, ``Z = X G``,
    and ``y[i] = z[i + right]``, exact as long as no tap wraps onto data
    (``L >= n + max(left, right)``). Gradients come from correlations, see
    :func:`_fft_backward`. Untransformed axes keep their taps: products become sums of
    shifted products there.

    ``X`` (for the weight gradient) and ``G`` (for the input gradient) are kept from the
    forward, so the backward costs one forward transform of ``dY``, one inverse transform
    per map and one per channel (the batch sum happens between spectra).

    Arguments of ``apply``: x, weight, axes (spatial axes to transform), sizes (FFT
    length per transformed axis), as given by :func:`fft_plan`, and the output's dtype
    (``x.dtype``, or autocast's dtype). Transforms run in fp32 (fp64 for fp64 inputs)
    whatever the dtypes of ``x`` and the kernel; gradients come back in their own dtypes.
    """

    @staticmethod
    def forward(ctx, x, weight, axes, sizes, out_dtype):
        compute = _compute_dtype(x.dtype)
        plan = _plan(tuple(x.shape), tuple(weight.shape[2:]), axes, sizes, _complex_itemsize(compute), x.device)
        # Blocks must be contiguous slices (channels-last input would make every FFT strided).
        xc = x.to(compute).contiguous()
        spec_g = plan.kernel_spectrum(weight, compute)
        keep_x = ctx.needs_input_grad[1]
        spec_x_all = xc.new_empty(plan.spec_shape, dtype=spec_g.dtype) if keep_x else None
        y = torch.empty_like(xc)
        for bs, cs, _ in plan.blocks():
            # Blocks are contiguous in the spectrum buffer, so the transform writes there.
            out = spec_x_all[bs, cs] if keep_x else None
            spec_x = torch.fft.rfftn(xc[bs, cs], s=sizes, dim=plan.dims, out=out)
            spec_y = _apply_taps(spec_x, spec_g[cs], plan.direct, plan.terms, inplace=not keep_x)
            y[bs, cs] = _inverse(spec_y, plan.dims, plan.sizes, plan.y_window)

        ctx.plan = plan
        ctx.dtypes = (x.dtype, weight.dtype, compute)
        ctx.save_for_backward(spec_x_all, spec_g if ctx.needs_input_grad[0] else None)
        return y.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        spec_x_all, spec_g = ctx.saved_tensors
        x_dtype, w_dtype, compute = ctx.dtypes
        need_x, need_w = ctx.needs_input_grad[:2]
        with autocast_off(grad_y.device.type):   # backward called inside an autocast region
            # Conjugates are materialised once: multiplying by a lazily conjugated tensor is
            # several times slower than a plain product.
            spec_g_conj = torch.conj_physical(spec_g) if need_x else None
            grad_x, grad_w = _fft_backward(
                ctx.plan, grad_y.to(compute), need_x, need_w, spec_g_conj=spec_g_conj, spec_x_all=spec_x_all
            )
        return (
            None if grad_x is None else grad_x.to(x_dtype),
            None if grad_w is None else grad_w.to(w_dtype),
            None,
            None,
            None,
        )


class MixedDepthwiseConv(torch.autograd.Function):
    """torch's convolution forward and for the input gradient, FFTs for the weight gradient.

    For small kernels torch's forward kernel is fast, and the input gradient is a forward
    convolution too (flipped kernel, mirrored padding), but torch's depthwise weight
    gradient runs at a fraction of that speed. Here it is the FFT correlation of ``x``
    and ``dY`` instead, which costs two forward transforms and one small inverse one.

    Arguments of ``apply``: as :class:`FFTDepthwiseConv`. The convolutions run in the
    output's dtype, as autocast would run them; the weight gradient's FFTs in fp32.
    """

    @staticmethod
    def forward(ctx, x, weight, axes, sizes, out_dtype):
        ctx.axes_sizes = (axes, sizes)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.x_dtype = x.dtype
        return direct_dwconv(x.to(out_dtype), weight.to(out_dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = grad_w = None
        with autocast_off(grad_y.device.type):   # backward called inside an autocast region
            if need_x:
                grad_x = direct_dwconv(grad_y, weight.to(grad_y.dtype), flip=True).to(ctx.x_dtype)
            if need_w:
                compute = _compute_dtype(x.dtype)
                plan = _plan(tuple(x.shape), tuple(weight.shape[2:]), *ctx.axes_sizes, _complex_itemsize(compute),
                             x.device)
                xc = x.to(compute).contiguous()
                _, grad_w = _fft_backward(plan, grad_y.to(compute).contiguous(), False, True, x=xc)
                grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None, None, None
