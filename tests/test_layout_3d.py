"""Token layouts and the 3D (slice-stack) adapter variants."""

from __future__ import annotations

import pytest
import torch

import medadapt
from medadapt.adapters.base import TokenLayout

from conftest import build_task


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


def test_3d_regrouping_puts_slices_of_one_volume_and_window_together():
    # 2 volumes x 3 slices x 4 windows, each window 2x2 channels-last.
    layout = TokenLayout("channels_last", items=4, spatial_dims=3, num_slices=3)
    x = torch.arange(2 * 3 * 4).float().reshape(24, 1, 1, 1).expand(24, 2, 2, 1)
    seen = {}

    def spy(m):
        seen["m"] = m.clone()
        return m

    out = layout.map_spatial(x, spy)
    assert torch.equal(out, x)
    m = seen["m"]  # (volumes * windows, C, D, h, w)
    assert m.shape == (8, 1, 3, 2, 2)
    # The item for volume 1, window 2 holds slices 0..2 of that window, in order.
    assert m[1 * 4 + 2, 0, :, 0, 0].tolist() == [(1 * 3 + d) * 4 + 2 for d in range(3)]
    with pytest.raises(ValueError, match="num_slices=3"):
        layout.map_spatial(x[:20], spy)


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
    reach3d = _perturbation_reach(family, 3, large_kernel=7, small_kernel=3)
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
