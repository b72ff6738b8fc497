"""Token layouts and the 3D (slice-stack) adapter variants."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_task

import medadapt
from medadapt.adapters.base import TokenLayout


def test_map_spatial_round_trips_every_layout():
    x = torch.randn(2, 4, 6, 5)  # (N, h, w, C)
    for layout, tokens in [
        (TokenLayout("channels_last"), x),
        (TokenLayout("sequence", grid=(4, 6), num_prefix=2), torch.randn(2, 2 + 24, 5)),
        (TokenLayout("channels_first"), x.permute(0, 3, 1, 2)),
    ]:
        t = layout.to_tokens(tokens)
        out = layout.from_tokens(layout.map_spatial(t, lambda m: m))
        assert torch.equal(out, tokens)


def test_sequence_layout_sees_the_grid_and_keeps_prefix_tokens():
    layout = TokenLayout("sequence", grid=(3, 4), num_prefix=1)
    tokens = torch.randn(1, 13, 2)
    seen = []

    def spy(m):
        seen.append(m.shape)
        return m * 0

    out = layout.map_spatial(tokens, spy)
    assert seen == [torch.Size([1, 2, 3, 4])]
    assert torch.equal(out[:, 0], tokens[:, 0]) and out[:, 1:].abs().sum() == 0
    # A new input size keeps the aspect ratio; an impossible count is a clear error.
    assert layout.resolve_grid(48) == (6, 8)
    with pytest.raises(ValueError, match="cannot arrange 13 tokens"):
        TokenLayout("sequence", grid=(3, 4)).resolve_grid(13)


def test_3d_regrouping_puts_the_slices_of_one_volume_together():
    # 2 volumes x 3 slices, each a 2x2 channels-last grid.
    layout = TokenLayout("channels_last", spatial_dims=3, num_slices=3)
    x = torch.arange(2 * 3).float().reshape(6, 1, 1, 1).expand(6, 2, 2, 1)
    seen = {}

    def spy(m):
        seen["m"] = m.clone()
        return m

    out = layout.map_spatial(x, spy)
    assert torch.equal(out, x)
    m = seen["m"]  # (volumes, C, D, h, w)
    assert m.shape == (2, 1, 3, 2, 2)
    assert m[1, 0, :, 0, 0].tolist() == [3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="num_slices=3"):
        layout.map_spatial(x[:4], spy)


def _partition(grid, window, shift=(0, 0)):
    """Reference windowing as the backbones do it: roll, pad bottom/right, row-major windows."""
    from segment_anything.modeling.image_encoder import window_partition

    return window_partition(torch.roll(grid, (-shift[0], -shift[1]), dims=(1, 2)), window[0])[0]


@pytest.mark.parametrize("kind,spatial_dims", [("channels_last", 2), ("sequence", 2), ("channels_last", 3)])
def test_windowed_layout_runs_the_spatial_part_on_the_whole_grid(kind, spatial_dims):
    # 2 volumes x 2 slices of a 5x7 grid, in 3x3 windows (padded to 6x9) shifted by (1, 2).
    grid = torch.randn(4, 5, 7, 3)
    windows = _partition(grid, (3, 3), shift=(1, 2))                        # (4 * 6, 3, 3, 3)
    tokens = windows if kind == "channels_last" else windows.reshape(24, 9, 3)
    layout = TokenLayout(kind, grid=(5, 7), window=(3, 3), shift=(1, 2), spatial_dims=spatial_dims, num_slices=2)
    seen = {}

    def spy(m):
        seen["m"] = m.clone()
        return m * 2

    out = layout.map_spatial(tokens, spy)
    whole = grid.permute(0, 3, 1, 2)
    if spatial_dims == 3:
        whole = whole.reshape(2, 2, 3, 5, 7).transpose(1, 2)
    assert torch.equal(seen["m"], whole)                       # the unshifted whole grid, in order
    expected = _partition(grid * 2, (3, 3), shift=(1, 2))         # padded positions stay zero
    assert torch.equal(out, expected if kind == "channels_last" else expected.reshape(24, 9, 3))
    with pytest.raises(ValueError, match="3x3 tokens, 6 per image of a 5x7 grid"):
        layout.map_spatial(tokens[:5], spy)


def _window_geometry(family, block):
    """(window, shift) of a windowed block, as the backbone partitions it."""
    if family == "sam_vit":
        return (block.window_size,) * 2, (0, 0)
    if family == "timm_swin":
        return tuple(block.window_size), tuple(block.shift_size)
    return (block.window_size,) * 2, (0, 0)


@pytest.mark.parametrize("family", ["sam_vit", "timm_swin", "tinyvit"])
def test_adapters_beside_windowed_attention_see_the_whole_grid(family):
    """In a windowed block, the update beside attention is A(x) on the whole grid, as the
    papers' equation x + MSA(x) + A(x) reads, not A applied window by window."""
    import dataclasses

    from medadapt.adapters.wrappers import Adapted

    model, x = build_task(family)
    medadapt.inject(model, "dka", large_kernel=9, small_kernel=3, placement="parallel")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ".up." in n:
                p.normal_(0, 0.5)
    wrappers = {name: m for name, m in model.encoder.named_modules()
                if isinstance(m, Adapted) and name.endswith(".attn") and m.adapter.layout.window is not None}
    assert wrappers, f"no windowed attention in the tiny {family}"
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
             for name, m in wrappers.items()]
    model.eval()
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    for name, wrapper in wrappers.items():
        adapter, layout = wrapper.adapter, wrapper.adapter.layout
        block = model.encoder.get_submodule(name.rsplit(".", 1)[0])
        window, shift = _window_geometry(family, block)
        assert (layout.window, layout.shift) == (window, shift)
        windows = inputs[name].reshape(-1, *window, inputs[name].shape[-1])
        (h, w), c = layout.grid, windows.shape[-1]
        nh, nw = -(-h // window[0]), -(-w // window[1])
        whole = windows.reshape(-1, nh, nw, *window, c).transpose(2, 3).reshape(-1, nh * window[0], nw * window[1], c)
        whole = torch.roll(whole[:, :h, :w], shift, dims=(1, 2))
        whole_grid_adapter = copy.copy(adapter)
        whole_grid_adapter.layout = dataclasses.replace(layout, kind="channels_last", window=None, shift=(0, 0))
        with torch.no_grad():
            expected = _partition(whole_grid_adapter(whole), window, shift)
            got = adapter(inputs[name]).reshape(expected.shape)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        # A window-by-window adapter would differ: the kernel reaches across windows.
        per_window = copy.copy(adapter)
        per_window.layout = dataclasses.replace(layout, kind="channels_last", window=None, shift=(0, 0))
        with torch.no_grad():
            assert not torch.allclose(per_window(windows).reshape(expected.shape), expected, atol=1e-5)


def _perturbation_reach(family, spatial_dims, method="dka", **options):
    """Which slices of which volume change when slice 0 of volume 0 changes."""
    model, x2d = build_task(family)
    d = 4
    x = torch.randn(2 * d, *x2d.shape[1:], generator=torch.Generator().manual_seed(0))
    medadapt.inject(model, method, spatial_dims=spatial_dims, num_slices=d if spatial_dims == 3 else None, **options)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ".up." in n:
                p.normal_(0, 0.5)
    model.eval()
    encoder = model.encoder
    with torch.no_grad():
        base = encoder(x)
        x_changed = x.clone()
        x_changed[0] += 1.0
        changed = encoder(x_changed)
    diff = (changed - base).flatten(1).abs().amax(dim=1)
    return diff.reshape(2, d) > 1e-6


@pytest.mark.parametrize("family", ["sam_vit", "timm_vit", "tinyvit"])
def test_3d_adapters_share_context_across_slices_of_one_volume_only(family):
    # One DKA per block, two blocks: a kernel 5 slices deep reaches the 4th slice in two steps.
    reach3d = _perturbation_reach(family, 3, large_kernel=[5, 7, 7], small_kernel=3)
    assert reach3d[0].all(), "a 3D adapter should pass context to neighbouring slices"
    assert not reach3d[1].any(), "context leaked into another volume"
    reach2d = _perturbation_reach(family, 2, large_kernel=7, small_kernel=3)
    assert reach2d[0, 0] and not reach2d[0, 1:].any() and not reach2d[1].any()


def test_3d_cladapter_flattens_over_slices():
    reach = _perturbation_reach("timm_convnext", 3, method="cladapter", bottleneck=8, num_clusters=3)
    assert reach[0].all() and not reach[1].any()


def test_3d_needs_num_slices():
    with pytest.raises(ValueError, match="num_slices"):
        medadapt.inject(build_task("sam_vit")[0], "dka", spatial_dims=3)
