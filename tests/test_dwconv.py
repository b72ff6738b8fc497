"""medadapt.ops.dwconv against torch's depthwise convolution, forward and both gradients."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from medadapt.ops import dwconv_impl
from medadapt.ops.dwconv import (
    choose_path,
    clip_kernel,
    dwconv,
    dwconv_multi,
    fft_size,
    fold_kernels,
)

# The float64 reference uses torch's padding="same", which warns about even kernels.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel:UserWarning")

# The spec's tolerance is about fp32; comparisons use relative error in norm, with the
# reference computed in float64 from the same fp32 values.
RTOL = 1e-4


def _reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    conv = F.conv2d if x.ndim == 4 else F.conv3d
    return conv(x, weight, padding="same", groups=x.shape[1])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check_against_torch(fn, x_shape, kernel_shapes, dtype=torch.float32, rtol=RTOL):
    """fn(x, kernels) must match the sum of torch convolutions in value and all gradients."""
    gen = torch.Generator().manual_seed(hash((x_shape, tuple(kernel_shapes))) % 2**31)
    x = torch.randn(*x_shape, generator=gen, dtype=dtype, requires_grad=True)
    ws = [torch.randn(x_shape[1], 1, *k, generator=gen, dtype=dtype, requires_grad=True) for k in kernel_shapes]
    y = fn(x, ws)
    assert y.shape == x.shape and y.dtype == dtype
    grad_out = torch.randn(y.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad(y, [x, *ws], grad_out)

    x64 = x.detach().double().requires_grad_()
    ws64 = [w.detach().double().requires_grad_() for w in ws]
    y64 = sum(_reference(x64, w) for w in ws64)
    grads64 = torch.autograd.grad(y64, [x64, *ws64], grad_out.double())

    assert _rel(y, y64) < rtol, f"forward off by {_rel(y, y64):.2e}"
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        assert g.shape == g64.shape and g.dtype == dtype
        assert _rel(g, g64) < rtol, f"gradient {i} off by {_rel(g, g64):.2e}"


CASES_2D = [
    ((2, 3, 16, 12), (5, 5)),      # odd, non-square map
    ((2, 3, 16, 12), (4, 6)),      # even
    ((2, 3, 16, 12), (7, 4)),      # mixed parity
    ((2, 3, 9, 11), (13, 13)),     # kernel larger than the map, no clipping yet
    ((2, 3, 7, 5), (31, 21)),      # odd kernel clipped on both axes
    ((2, 3, 7, 5), (16, 12)),      # even kernel clipped on both axes
    ((2, 3, 7, 5), (14, 10)),      # even kernel: cut at the high end only
    ((2, 2, 6, 8), (1, 9)),        # a single tap along one axis
]
CASES_3D = [
    ((2, 2, 4, 10, 6), (3, 5, 5)),
    ((2, 2, 4, 10, 6), (2, 4, 6)),
    ((2, 2, 3, 7, 5), (9, 17, 12)),   # clipped on all axes, odd and even
    ((2, 2, 5, 6, 7), (3, 1, 1)),
    ((2, 2, 1, 8, 6), (1, 3, 3)),     # a single slice
]


@pytest.mark.parametrize("path", ["direct", "fft", "mixed"])
@pytest.mark.parametrize("x_shape,kernel", CASES_2D + CASES_3D)
def test_dwconv_matches_torch(path, x_shape, kernel):
    _check_against_torch(lambda x, ws: dwconv(x, ws[0], path=path), x_shape, [kernel])


# Channel ranges of one sample; whole samples; all maps at once (as on a GPU).
@pytest.mark.parametrize("maps_per_block", [1, 2, 5, 10, 1000])
@pytest.mark.parametrize("path", ["fft", "mixed"])
@pytest.mark.parametrize("x_shape,kernel", [((3, 5, 9, 7), (7, 4)), ((3, 5, 4, 9, 8), (3, 7, 6))])
def test_fft_blocks_cover_every_map(monkeypatch, maps_per_block, path, x_shape, kernel):
    """Large inputs are processed in blocks of maps; force small blocks on small inputs."""
    monkeypatch.setattr(dwconv_impl, "_maps_per_block", lambda map_bytes: maps_per_block)
    _check_against_torch(lambda x, ws: dwconv(x, ws[0], path=path), x_shape, [kernel])


@pytest.mark.parametrize("path", ["fft", "mixed"])
@pytest.mark.parametrize("x_shape,kernel", [((2, 3, 16, 12), (5, 5)), ((2, 3, 7, 5), (16, 12)), ((2, 2, 3, 7, 5), (9, 17, 12))])
def test_fft_paths_in_float64_are_exact(path, x_shape, kernel):
    _check_against_torch(lambda x, ws: dwconv(x, ws[0], path=path), x_shape, [kernel], dtype=torch.float64, rtol=1e-10)


@pytest.mark.parametrize("x_shape,kernel", [((2, 4, 64, 48), (51, 51)), ((2, 2, 6, 24, 20), (3, 31, 31))])
def test_automatic_path_at_adapter_sizes(x_shape, kernel):
    """The shapes the adapters use, through whatever path the cost model picks (FFT-based here)."""
    assert choose_path(x_shape, (x_shape[1], 1, *kernel), requires_grad=True) != "direct"
    _check_against_torch(lambda x, ws: dwconv(x, ws[0]), x_shape, [kernel])


def test_choose_path():
    # Small kernels in inference stay on torch's fast forward kernel.
    assert choose_path((2, 16, 64, 64), (16, 1, 3, 3)) == "direct"
    assert choose_path((2, 16, 64, 64), (16, 1, 5, 5)) == "direct"
    assert choose_path((2, 16, 64, 64), (16, 1, 3, 3), requires_grad=True) == "direct"
    # Large kernels go through the FFT, with or without gradients.
    assert choose_path((2, 16, 64, 64), (16, 1, 51, 51)) == "fft"
    assert choose_path((2, 192, 64, 64), (16, 1, 51, 51), requires_grad=True) == "fft"
    assert choose_path((2, 16, 16, 64, 64), (16, 1, 3, 51, 51), requires_grad=True) == "fft"
    # A 1x1 kernel is a scaling: never worth a transform.
    assert choose_path((2, 16, 64, 64), (16, 1, 1, 1), requires_grad=True) == "direct"


def test_fft_is_used_and_differentiable():
    x = torch.randn(1, 2, 32, 32, requires_grad=True)
    w = torch.randn(2, 1, 31, 31, requires_grad=True)
    y = dwconv(x, w)
    assert y.grad_fn is not None and "FFT" in type(y.grad_fn).__name__
    with torch.no_grad():
        assert dwconv(x, w).grad_fn is None


def test_fft_size_is_smooth_and_large_enough():
    for n in range(1, 300):
        m = fft_size(n)
        assert m >= n
        rest = m
        for p in (2, 3, 5, 7):
            while rest % p == 0:
                rest //= p
        assert rest == 1, (n, m)
    assert fft_size(89) == 96


def test_clip_kernel():
    w = torch.randn(3, 1, 31, 8)
    clipped = clip_kernel(w, (7, 5))
    assert clipped.shape == (3, 1, 13, 8)
    assert torch.equal(clipped, w[:, :, 9:22])   # odd: the central 2 * 7 - 1 taps
    even = clip_kernel(torch.randn(1, 1, 14, 2), (7, 5))
    assert even.shape == (1, 1, 13, 2)           # even: torch's "same" centre is kept
    assert clip_kernel(w, (40, 40)).shape == w.shape


def test_clipping_keeps_values_for_huge_kernels():
    x = torch.randn(2, 3, 6, 4, dtype=torch.float64)
    w = torch.randn(3, 1, 41, 40, dtype=torch.float64)
    for path in ("direct", "fft"):
        assert torch.allclose(dwconv(x, w, path=path), _reference(x, w), atol=1e-10)


@pytest.mark.parametrize("path", [None, "direct", "fft", "mixed"])
@pytest.mark.parametrize(
    "x_shape,kernels",
    [
        ((2, 3, 20, 16), [(15, 15), (5, 5)]),
        ((2, 3, 20, 16), [(5, 5), (15, 15), (1, 1)]),
        ((2, 3, 20, 16), [(6, 8), (4, 4)]),          # even kernels
        ((2, 3, 9, 7), [(31, 31), (3, 3)]),           # the big one is clipped first
        ((2, 2, 4, 10, 8), [(3, 11, 11), (3, 3, 3)]),
    ],
)
def test_dwconv_multi_matches_sum_of_convs(path, x_shape, kernels):
    _check_against_torch(lambda x, ws: dwconv_multi(x, ws, path=path), x_shape, kernels)


@pytest.mark.parametrize("kernels", [[(51, 51), (5, 5)], [(6, 8), (4, 2)], [(7, 7), (4, 4)], [(3, 9, 9), (1, 5, 5), (3, 3, 3)]])
def test_fold_kernels_is_exact(kernels):
    ndim = len(kernels[0])
    x = torch.randn(2, 3, *([8] * (ndim - 1)), 40, dtype=torch.float64)
    ws = [torch.randn(3, 1, *k, dtype=torch.float64) for k in kernels]
    folded = fold_kernels(ws)
    assert folded.shape == (3, 1, *(max(k[d] for k in kernels) for d in range(ndim)))
    expected = sum(_reference(x, w) for w in ws)
    assert torch.allclose(_reference(x, folded), expected, atol=1e-9)


def test_fold_kernels_centre_pads():
    big = torch.zeros(1, 1, 5, 5)
    small = torch.ones(1, 1, 3, 3)
    folded = fold_kernels([big, small])
    assert torch.equal(folded[0, 0, 1:4, 1:4], torch.ones(3, 3))
    assert folded.sum() == 9


def test_half_precision_inputs_run_through_fft():
    x = torch.randn(1, 2, 16, 16).to(torch.bfloat16)
    w = torch.randn(2, 1, 9, 9).to(torch.bfloat16)
    y = dwconv(x, w, path="fft")
    assert y.dtype == torch.bfloat16
    ref = _reference(x.float(), w.float())
    assert _rel(y.float(), ref) < 2e-2


# Mixed precision: under CPU bf16 autocast every path must give what torch's convolution
# gives there (a bf16 result, gradients in the inputs' dtypes), close to the fp32 values.
AMP_RTOL = 2e-2
AMP_CASES = [
    ((2, 4, 24, 20), (51, 51)),       # clipped to the map, FFT territory
    ((2, 4, 24, 20), (5, 5)),
    ((2, 4, 24, 20), (3, 3)),
    ((1, 3, 4, 12, 10), (3, 51, 51)),
    ((1, 3, 4, 12, 10), (3, 5, 5)),
]


def _check_under_autocast(fn, x_shape, kernel_shapes, input_dtype):
    """fn(x, kernels) under bf16 autocast against torch convolutions of the same fp32 values (in fp64)."""
    gen = torch.Generator().manual_seed(hash((x_shape, tuple(kernel_shapes))) % 2**31)
    x = torch.randn(*x_shape, generator=gen, requires_grad=True)
    ws = [torch.randn(x_shape[1], 1, *k, generator=gen, requires_grad=True) for k in kernel_shapes]
    grad_out = torch.randn(*x_shape, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # An adapter's convolution sees the bf16 output of a linear layer; a plain fp32
        # input must work as well.
        y = fn(x.to(input_dtype), ws)
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y, [x, *ws], grad_out.to(y.dtype))

    x64 = x.detach().double().requires_grad_()
    ws64 = [w.detach().double().requires_grad_() for w in ws]
    y64 = sum(_reference(x64, w) for w in ws64)
    grads64 = torch.autograd.grad(y64, [x64, *ws64], grad_out.double())
    named = [("output", y, y64)] + [(f"gradient {i}", g, g64) for i, (g, g64) in enumerate(zip(grads, grads64))]
    for name, got, want in named:
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        assert _rel(got, want) < AMP_RTOL, f"{name} off by {_rel(got, want):.2e}"
    assert all(g.dtype == torch.float32 for g in grads)   # the leaves' own dtype


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", [None, "direct", "fft", "mixed"])
@pytest.mark.parametrize("x_shape,kernel", AMP_CASES)
def test_dwconv_under_bf16_autocast(path, x_shape, kernel, input_dtype):
    _check_under_autocast(lambda x, ws: dwconv(x, ws[0], path=path), x_shape, [kernel], input_dtype)


@pytest.mark.parametrize("path", [None, "fft", "mixed"])
@pytest.mark.parametrize(
    "x_shape,kernels", [((2, 4, 24, 20), [(51, 51), (5, 5)]), ((1, 3, 4, 12, 10), [(3, 51, 51), (3, 5, 5)])]
)
def test_dwconv_multi_under_bf16_autocast(path, x_shape, kernels):
    """A Dual-Kernel Adapter's two kernels, folded into one convolution."""
    _check_under_autocast(lambda x, ws: dwconv_multi(x, ws, path=path), x_shape, kernels, torch.bfloat16)


@pytest.mark.parametrize("path", ["fft", "mixed"])
def test_backward_inside_autocast_region(path):
    """Hand-written backward passes must not meet autocast's casts when backward runs inside it."""
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    w = torch.randn(4, 1, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dwconv(x.to(torch.bfloat16), w, path=path)
        y.float().square().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_dka_adapter_trains_under_bf16_autocast(spatial_dims):
    """DKA forward + backward under autocast, against the same module in fp32."""
    from medadapt.adapters.base import TokenLayout
    from medadapt.adapters.dka import DualKernelAdapter

    torch.manual_seed(0)
    layout = TokenLayout("channels_last", spatial_dims=spatial_dims, num_slices=4 if spatial_dims == 3 else 1)
    adapter = DualKernelAdapter(16, layout, bottleneck=4, dropout=0.0, zero_init=False)
    tokens = torch.randn(4 if spatial_dims == 3 else 2, 20, 20, 16)
    params = [adapter.large, adapter.small, adapter.down.weight, adapter.up.weight]

    def run(amp: bool):
        x = tokens.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = adapter(x)
        grads = torch.autograd.grad(out.float().square().mean(), [x, *params])
        return out, grads

    out32, grads32 = run(False)
    out16, grads16 = run(True)
    assert out16.dtype == torch.bfloat16 and out32.dtype == torch.float32
    for got, want in zip((out16, *grads16), (out32, *grads32)):
        assert torch.isfinite(got).all()
        assert _rel(got, want) < AMP_RTOL, f"off by {_rel(got, want):.2e}"


def test_bad_inputs_raise_value_error():
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="not depthwise for 4 channels"):
        dwconv(x, torch.randn(3, 1, 3, 3))
    with pytest.raises(ValueError, match="not depthwise"):
        dwconv(x, torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="must have 4 dimensions"):
        dwconv(x, torch.randn(4, 1, 3, 3, 3))
    with pytest.raises(ValueError, match="2D map"):
        dwconv(torch.randn(4, 8, 8), torch.randn(4, 1, 3, 3))
    with pytest.raises(ValueError, match="path"):
        dwconv(x, torch.randn(4, 1, 3, 3), path="winograd")
    with pytest.raises(ValueError, match="non-empty list"):
        dwconv_multi(x, [])
    with pytest.raises(ValueError, match="not depthwise"):
        dwconv_multi(x, [torch.randn(4, 1, 5, 5), torch.randn(2, 1, 3, 3)])
    with pytest.raises(ValueError, match="same number of dimensions"):
        fold_kernels([torch.randn(4, 1, 5, 5), torch.randn(4, 1, 3, 3, 3)])


# ----------------------------------------------------------------------------- graph capture (export)

@pytest.mark.parametrize("x_shape,kernel", CASES_2D + CASES_3D)
def test_plain_fft_dwconv_matches_torch_and_scripts(x_shape, kernel):
    """fft_dwconv, the FFT path as plain torch code, is exact and compiles with TorchScript."""
    scripted = torch.jit.script(dwconv_impl.fft_dwconv)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*x_shape, generator=gen, dtype=torch.float64)
    w = torch.randn(x_shape[1], 1, *kernel, generator=gen, dtype=torch.float64)
    w = clip_kernel(w, x_shape[2:])
    sizes = dwconv_impl.export_fft_sizes(tuple(x_shape[2:]), tuple(w.shape[2:]))
    reference = _reference(x, w)
    assert _rel(dwconv_impl.fft_dwconv(x, w, sizes), reference) < 1e-12
    assert _rel(scripted(x, w, sizes), reference) < 1e-12


class _Conv(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(weight)

    def forward(self, x):
        return dwconv(x, self.w)


@pytest.mark.parametrize("x_shape,kernel", [((1, 8, 48, 40), (51, 51)), ((1, 4, 4, 40, 36), (3, 51, 51))])
def test_traced_dwconv_is_plain_torch_and_takes_any_batch(x_shape, kernel):
    """Under torch.jit.trace the FFT path records as fft ops (no Python autograd Function, so
    the graph saves), with the inference path's choice even when gradients are enabled."""
    import io

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*x_shape, generator=gen)
    module = _Conv(torch.randn(x_shape[1], 1, *kernel, generator=gen))
    assert module.w.requires_grad and choose_path(x.shape, module.w.shape) == "fft"
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)   # shapes are read as ints on purpose
        traced = torch.jit.trace(module, (x,), check_trace=False)
    graph = str(traced.inlined_graph)
    assert "fft_rfftn" in graph and "PythonOp" not in graph
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x3 = torch.randn(3, *x_shape[1:], generator=gen)
    with torch.no_grad():
        assert _rel(loaded(x3), _reference(x3.double(), module.w.detach().double())) < RTOL


def test_dwconv_exports_with_torch_export():
    """torch.export (what torch.onnx.export uses) records the plain FFT ops as well."""
    gen = torch.Generator().manual_seed(3)
    module, x = _Conv(torch.randn(4, 1, 51, 51, generator=gen)).eval(), torch.randn(1, 4, 40, 40, generator=gen)
    program = torch.export.export(module, (x,), strict=False)
    assert "fft_rfftn" in str(program.graph)
    with torch.no_grad():
        assert _rel(program.module()(x), _reference(x.double(), module.w.detach().double())) < RTOL


def test_benchmark_quick_run_smoke():
    """benchmarks/perf_dwconv.py runs and reports complete rows (speed is not asserted here)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "perf_dwconv.py"
    spec = importlib.util.spec_from_file_location("perf_dwconv", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # The real cases take seconds on torch's side; the same rows on small shapes suffice here.
    bench.CASES = [
        ("tiny 2D", (2, 4, 16, 16), [(9, 9)], 1.0, True, None),
        ("tiny 3D", (2, 4, 4, 8, 8), [(3, 5, 5)], 1.0, True, 1),
        ("tiny multi", (2, 4, 16, 16), [(9, 9), (3, 3)], 1.0, True, None),
        ("skipped when quick", (2, 4, 16, 16), [(3, 3)], 1.0, False, None),
    ]
    rows = bench.run(quick=True)
    assert [r["name"] for r in rows] == ["tiny 2D", "tiny 3D", "tiny multi"]
    assert rows and all(r["torch_ms"] > 0 and r["medadapt_ms"] > 0 for r in rows)
    assert {"name", "shape", "kernel", "torch_ms", "medadapt_ms", "speedup", "target", "pass"} <= set(rows[0])
    assert "| name |" in bench.to_markdown(rows)


def _load_benchmark(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_smoke_run_on_cpu(tmp_path):
    """benchmarks/gpu.py --smoke builds every row it can on the CPU and writes both files."""
    import json

    bench = _load_benchmark("gpu")
    assert bench.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu.json").read_text(encoding="utf-8"))["rows"]
    assert not [r["name"] for r in rows if r["note"].startswith("failed")]
    sections = [r["section"] for r in rows]
    assert sections.count("dwconv") == 2 * len(bench.DWCONV_CASES)   # float32 and bf16 per case
    assert sections.count("step") == 2 * len(bench.SMOKE.batches) and "amp" in sections
    assert all(r["baseline"] > 0 and r["ours"] > 0 for r in rows)
    dwconv_targets = {r["name"].split(",")[0]: r["target"] for r in rows if r["section"] == "dwconv"}
    assert dwconv_targets["2D k51 16ch"] == ">= 5x faster" and dwconv_targets["2D k3 16ch"] is None
    assert all(r["target"] == "<= 1.1" and isinstance(r["pass"], bool) for r in rows if r["section"] == "step")
    table = (tmp_path / "gpu.md").read_text(encoding="utf-8")
    assert "| section | comparison |" in table and table.count("\n| dwconv |") == sections.count("dwconv")


def test_gpu_benchmark_without_a_gpu_exits_with_code_2(monkeypatch, capsys):
    bench = _load_benchmark("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in ([], ["--device", "cuda"], ["--device", "cpu"]):   # the CPU only with --smoke
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2
        assert "needs a GPU" in capsys.readouterr().err
