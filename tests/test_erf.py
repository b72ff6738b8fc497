"""Effective receptive field analysis: exact ERFs of known operators, kernel-size growth of DKA,
the through-slice profile of 3D adapters, the comparison figure and ``medadapt erf``."""

from __future__ import annotations

import functools
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import medadapt
from medadapt.analysis import (
    compare_erf,
    effective_receptive_field,
    feature_maps,
    high_contribution_area_ratio,
    normalise_erf,
    scaled_for_ratio,
    volume_effective_receptive_field,
)
from medadapt.cli import main

TINY_SAM = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=2)
TINY_CONVNEXT = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))


@functools.lru_cache(maxsize=None)
def mni_slices(size: int) -> torch.Tensor:
    """Real axial MNI152 T1 slices (4, 3, size, size) in [0, 1]."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=2).get_fdata()
    image = torch.tensor(np.stack([t1[:, :, z] for z in (40, 46, 52, 58)]), dtype=torch.float32)[:, None]
    image = F.interpolate(image / image.max(), size=(size, size), mode="bilinear", align_corners=False)
    return image.repeat(1, 3, 1, 1)


def _build(task, backbone="timm:convnext_atto", seed=0, **kwargs):
    options = TINY_SAM if backbone == "medsam_vit_b" else TINY_CONVNEXT
    # The same seed gives the same random backbone, so models differ only in their adapters.
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random tiny backbones warn that they are not pretrained
        return medadapt.create_model(task, backbone=backbone, backbone_options=options, **kwargs)


def _randomise_up_projections(model, std=0.1, seed=1):
    # Zero-initialised up-projections make every adapter the identity, and every ERF the
    # backbone's; random ones stand in for trained adapters.
    generator = torch.Generator().manual_seed(seed)
    ups = [p for n, p in model.named_parameters() if n.endswith(".up.weight")]
    assert ups, "no adapter up-projection found"
    with torch.no_grad():
        for p in ups:
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model


def _conv(k, weight=None, in_channels=3, out_channels=4):
    conv = nn.Conv2d(in_channels, out_channels, k, padding="same", bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight if weight is not None else torch.rand(conv.weight.shape) + 0.1)
    return conv


# ----------------------------------------------------------------------------- known operators

@pytest.mark.parametrize("k", [1, 3, 7])
def test_erf_of_a_single_convolution_is_its_kernel(k):
    conv = _conv(k)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    erf = effective_receptive_field(conv, images)
    # d(sum_o y_o[c]) / d x_i[c + v] = sum_o W[o, i, v + k // 2]; positive weights and inputs
    # keep every ReLU open, so the ERF is the kernel summed over channels, centred at (16, 16).
    r = k // 2
    expected = np.zeros((32, 32))
    expected[16 - r:16 + r + 1, 16 - r:16 + r + 1] = conv.weight.detach().double().sum(dim=(0, 1)).numpy()
    np.testing.assert_allclose(erf, expected, rtol=1e-5)
    support = np.argwhere(erf > 0)
    assert support.min(axis=0).tolist() == [16 - r] * 2 and support.max(axis=0).tolist() == [16 + r] * 2
    assert len(support) == k * k
    # The k x k square holds everything, so no threshold needs more than its area.
    ratios = high_contribution_area_ratio(erf)
    assert ratios[0.99]["side"] <= k and ratios[0.99]["area_ratio"] <= k * k / (32 * 32)


def test_erf_relus_the_central_outputs_and_the_input_gradients():
    # Signed weights: the recipe keeps only output channels that are positive at the centre
    # (ReLU before the channel sum) and positive gradients (ReLU before the input-channel sum).
    k, r = 5, 2
    weight = torch.randn(4, 3, k, k, generator=torch.Generator().manual_seed(1))
    conv = _conv(k, weight)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        open_channels = (conv(images)[:, :, 16, 16] > 0).double()  # (N, O)
    per_image = torch.einsum("no,oiyx->niyx", open_channels, weight.double()).clamp_min(0).sum(dim=1)
    expected = np.zeros((32, 32))
    expected[16 - r:16 + r + 1, 16 - r:16 + r + 1] = per_image.mean(dim=0).numpy()
    np.testing.assert_allclose(effective_receptive_field(conv, images, batch_size=4), expected, rtol=1e-5, atol=1e-7)
    # Without the output ReLU every output channel counts.
    all_channels = weight.double().sum(dim=0).clamp_min(0).sum(dim=0).numpy()
    expected[16 - r:16 + r + 1, 16 - r:16 + r + 1] = all_channels
    np.testing.assert_allclose(effective_receptive_field(conv, images, output_relu=False), expected,
                               rtol=1e-5, atol=1e-7)


def test_area_ratio_of_a_uniform_kernel_follows_the_definition():
    k = 7
    erf = effective_receptive_field(_conv(k, torch.ones(4, 3, k, k)), torch.rand(2, 3, 32, 32))
    ratios = high_contribution_area_ratio(erf, (0.2, 0.3, 0.5, 0.99, 1.0))
    for t, result in ratios.items():
        # A central odd square of side s holds s^2 / k^2 of a uniform k x k ERF.
        side = next(s for s in range(1, k + 1, 2) if s * s >= t * k * k)
        assert result == {"side": side, "area_ratio": side * side / (32 * 32)}, t


def test_area_ratio_clips_squares_at_the_border():
    # Uniform (4, 6): centre (2, 3); the whole map needs radius 3 (columns 0..5), rows clip to 0..3.
    assert high_contribution_area_ratio(np.ones((4, 6)), (1.0,)) == {1.0: {"side": 7, "area_ratio": 1.0}}
    delta = np.zeros((9, 9))
    delta[4, 4] = 5.0
    assert all(r == {"side": 1, "area_ratio": 1 / 81} for r in high_contribution_area_ratio(delta).values())
    with pytest.raises(ValueError, match="all zero"):
        high_contribution_area_ratio(np.zeros((5, 5)))
    with pytest.raises(ValueError, match="thresholds"):
        high_contribution_area_ratio(np.ones((5, 5)), (0.0,))


def test_normalise_erf_is_log_then_min_max():
    normalised = normalise_erf(np.array([[0.0, 9.0, 99.0]]))  # log10(x + 1) = 0, 1, 2
    np.testing.assert_allclose(normalised, [[0.0, 0.5, 1.0]])
    np.testing.assert_allclose(scaled_for_ratio(np.array([9.0]), "log"), [1.0])
    assert not normalise_erf(np.full((3, 3), 4.0)).any()


# ----------------------------------------------------------------------------- task models

def test_feature_maps_follow_the_task_models_own_forward():
    images = mni_slices(64)[:2]
    classifier = _build("classification", method="dka", method_options={"large_kernel": 7})
    classifier = _randomise_up_projections(classifier).eval()
    with torch.no_grad():
        pooled = feature_maps(classifier, images)[-1].flatten(2).mean(dim=-1)
        torch.testing.assert_close(classifier.head(pooled), classifier(images))
    # A fixed-size encoder with a grey-scale stem: stem, resize and preprocess on the way in.
    segmenter = _build("segmentation", backbone="medsam_vit_b", in_channels=1, method="dka",
                       method_options={"large_kernel": 5}).eval()
    grey = images[:, :1, :48, :48]
    with torch.no_grad():
        logits = F.interpolate(segmenter.decoder(feature_maps(segmenter, grey)), size=(48, 48), mode="bilinear",
                               align_corners=False)
        torch.testing.assert_close(logits, segmenter(grey))


def test_fresh_zero_initialised_adapters_leave_the_backbones_erf():
    images = mni_slices(128)[:2]
    fresh = [_build("classification", method="dka", method_options={"large_kernel": k}) for k in (3, 25)]
    erfs = [effective_receptive_field(m, images) for m in fresh]
    with medadapt.disable_adapters(fresh[0]):
        backbone_erf = effective_receptive_field(fresh[0], images)
    np.testing.assert_allclose(erfs[0], backbone_erf, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(erfs[1], backbone_erf, rtol=1e-6, atol=1e-9)
    randomised = effective_receptive_field(_randomise_up_projections(fresh[1]), images)
    assert not np.allclose(randomised, backbone_erf)


def test_high_contribution_area_grows_with_the_dka_kernel():
    # 512 pixels: the tiny ConvNeXt's last stage (stride 32) is then 16 x 16, so the adapted
    # receptive fields (a k x k kernel there spans 32 k pixels: 160, 288, 800 with the folded
    # 5 x 5 small kernel) are not all cut off by the image border. At 128 pixels the last
    # map is 4 x 4 and every kernel >= 5 already covers the image, so the ratios saturate.
    # The area is taken at 0.99: the central half of the contribution stays the frozen
    # backbone's own (its share barely moves with k), while the adapters add the wide tail.
    images = mni_slices(512)[:2]
    areas = []
    for k in (3, 9, 25):
        model = _randomise_up_projections(_build("classification", method="dka", method_options={"large_kernel": k}))
        ratios = high_contribution_area_ratio(effective_receptive_field(model, images), (0.99,))
        areas.append(ratios[0.99]["area_ratio"])
    assert areas[0] < areas[1] < areas[2] < 1.0, areas


def test_min_max_normalisation_gives_the_extreme_pixels_no_spurious_mass():
    # MedSAM rescales each image by its own min and max. Were the gradient taken through those
    # statistics, every pixel's gradient would also reach the darkest and brightest pixel (3.7
    # there against 0.08 around it here); taken with respect to the normalised image, as
    # RepLKNet does, those pixels are like their neighbours.
    images = 0.2 + 0.6 * torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    darkest, brightest = (10, 12), (50, 40)
    images[(slice(None), slice(None)) + darkest] = 0.0
    images[(slice(None), slice(None)) + brightest] = 1.0
    model = _build("classification", backbone="medsam_vit_b", method="linear")
    erf = effective_receptive_field(model, images)
    for y, x in (darkest, brightest):
        around = erf[y - 2:y + 3, x - 2:x + 3].copy()
        around[2, 2] = 0.0
        assert erf[y, x] <= 2 * around.max(), ((y, x), erf[y, x], around.max())
    # The forward pass is the model's own: the same features with and without the analysis mode.
    from medadapt.backbones.base import normalised_input_gradients

    with torch.no_grad(), normalised_input_gradients(model):
        inside = feature_maps(model, images)[-1]
    with torch.no_grad():
        torch.testing.assert_close(inside, feature_maps(model, images)[-1])


# ----------------------------------------------------------------------------- 3D

def _volume_model(slice_axis=2, **method_options):
    # ConvNeXt normalises per channel (no per-volume min-max), so its encoder never mixes
    # slices: the only depth mixing is the adapters', which makes the profile's support known.
    options = dict(large_kernel=7, small_kernel=3, use_torch_conv=True, **method_options)
    model = _build("segmentation3d", num_classes=2, num_slices=5, slice_axis=slice_axis, method="dka",
                   method_options=options)
    return _randomise_up_projections(model)


def _volumes():
    slices = mni_slices(64)[:1, :, :, :].repeat(5, 1, 1, 1)  # 5 slices, (S, 3, H, W)
    noise = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    return (0.8 * slices + 0.2 * noise).permute(1, 2, 3, 0)[None]  # (1, 3, X, Y, Z), slices on Z


def test_volume_feature_maps_follow_the_volume_segmenters_forward():
    model, volume = _volume_model().eval(), _volumes()
    with torch.no_grad():
        logits = F.interpolate(model.decoder(feature_maps(model, volume)), size=(5, 64, 64), mode="trilinear",
                               align_corners=False).movedim(2, 4)
        torch.testing.assert_close(logits, model(volume))


@pytest.mark.parametrize("targets, spatial_dims, reach", [([0], 2, 0), ([0], 3, 1), ([0, 1], 3, 2)])
def test_through_slice_profile_reaches_as_far_as_the_depth_kernels(targets, spatial_dims, reach):
    # Each 3D DKA has depth-3 kernels and mixes a slice with its two neighbours; 2D adapters
    # mix nothing. The central unit of slice 2 therefore sees exactly slices 2 +- reach.
    model = _volume_model(targets=targets, spatial_dims=spatial_dims)
    result = volume_effective_receptive_field(model, _volumes())
    seen = [abs(offset) <= reach for offset in range(-2, 3)]
    assert [bool(share > 0) for share in result.profile] == seen
    assert math.isclose(result.profile.sum(), 1.0)
    np.testing.assert_allclose(result.profile, result.volume.sum(axis=(1, 2)) / result.volume.sum())
    np.testing.assert_array_equal(result.central, result.volume[2])
    np.testing.assert_array_equal(effective_receptive_field(model, _volumes()), result.central)


def test_slice_axis_is_respected():
    volume = _volumes()
    along_z = volume_effective_receptive_field(_volume_model(targets=[0, 1]), volume)
    # The same model slicing along X, fed the same volume with its slices moved to X.
    along_x = volume_effective_receptive_field(_volume_model(slice_axis=0, targets=[0, 1]), volume.movedim(4, 2))
    np.testing.assert_allclose(along_x.profile, along_z.profile, rtol=1e-5)
    np.testing.assert_allclose(along_x.central, along_z.central, rtol=1e-5, atol=1e-12)


# ----------------------------------------------------------------------------- figure and CLI

def test_compare_erf_draws_a_figure_and_returns_the_ratios(tmp_path):
    images = torch.rand(2, 3, 32, 32)
    out = tmp_path / "figs" / "erf.png"
    path, ratios = compare_erf({"3x3": _conv(3), "7x7": _conv(7)}, images, out, scale="raw")
    assert path == out
    with Image.open(out) as figure:
        assert figure.format == "PNG" and figure.width > figure.height > 0
    assert set(ratios) == {"3x3", "7x7"}
    assert ratios["3x3"][0.99]["side"] <= 3 < ratios["7x7"][0.99]["side"] <= 7
    # Volume models add a row of through-slice profiles.
    out3d = tmp_path / "erf3d.png"
    compare_erf({"dka 3D": _volume_model(targets=[0])}, _volumes(), out3d)
    with Image.open(out3d) as figure:
        assert figure.height > figure.width > 0


@pytest.fixture
def png_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(mni_slices(80)[:3]):
        Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).save(folder / f"slice{i}.png")
    return folder


def _rows(output: str) -> dict[str, str]:
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    rows = {}
    for line in lines[header + 1:]:
        if line.startswith("wrote"):
            break
        name, _, cells = line.partition(" ")
        rows[name] = cells.strip()
    return rows


CLI_MODEL = ["--task", "classification", "--backbone", "timm:convnext_atto",
             "--backbone-option", "depths=[1,1,1,1]", "--backbone-option", "dims=[8,16,24,32]"]


def test_cli_compares_fresh_methods_on_real_images(png_folder, tmp_path, capsys):
    out = tmp_path / "erf.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["erf", *CLI_MODEL, "--method", "dka", "--method", "adapter", "--images", str(png_folder),
                     "--out", str(out), "--num-images", "2", "--size", "96"])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file()
    with Image.open(out) as figure:
        assert figure.width > 0 and figure.height > 0
    assert "freshly injected" in printed and "2 images of 96x96" in printed
    rows = _rows(printed)
    assert set(rows) == {"dka", "adapter"}
    # Zero-initialised adapters on the same (seeded) backbone: both show the backbone's ERF.
    assert rows["dka"] == rows["adapter"]


def test_cli_loads_adapters_per_method_and_reads_bundles(png_folder, tmp_path, capsys):
    trained = _randomise_up_projections(_build("classification", method="dka", method_options={"large_kernel": 9}))
    medadapt.save_adapters(trained, tmp_path / "ckpt" / "dka")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "train.json").write_text(json.dumps({
        "backbone_name": "timm:convnext_atto",
        "network_def": {"_target_": "medadapt.models.create_model", "task": "classification",
                        "backbone": "@backbone_name", "num_classes": 2, "method": "dka",
                        "method_options": {"large_kernel": 9}, "backbone_options": TINY_CONVNEXT},
        "trainer": {"_target_": "not.a.module.Trainer"},  # never instantiated
    }))
    common = ["--images", str(png_folder), "--num-images", "2", "--size", "96"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["erf", "--bundle", str(bundle), "--out", str(tmp_path / "a.png"), *common]) == 0
        fresh = _rows(capsys.readouterr().out)
        assert main(["erf", "--bundle", str(bundle), "--checkpoint-dir", str(tmp_path / "ckpt"),
                     "--out", str(tmp_path / "b.png"), *common]) == 0
        loaded_output = capsys.readouterr().out
    loaded = _rows(loaded_output)
    assert set(fresh) == set(loaded) == {"dka"} and "freshly injected" not in loaded_output
    # The trained adapters change the ERF: the same numbers as measuring the model directly.
    direct = high_contribution_area_ratio(scaled_for_ratio(effective_receptive_field(
        trained, torch.stack([_png_input(p, 96) for p in sorted(png_folder.iterdir())[:2]]))))
    assert loaded["dka"] != fresh["dka"]
    assert loaded["dka"].split() == " ".join(f"{r['side']} / {r['area_ratio']:.4f}" for r in direct.values()).split()

    assert main(["erf", "--bundle", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c.png"), *common]) == 2
    assert str(tmp_path / "nowhere" / "train.json") in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["erf", "--bundle", str(bundle), "--method", "adapter", "--checkpoint-dir",
                     str(tmp_path / "ckpt"), "--out", str(tmp_path / "d.png"), *common]) == 2
    assert str(tmp_path / "ckpt" / "adapter") in capsys.readouterr().err


def _png_input(path, size):
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def test_cli_input_errors_are_one_line_naming_the_input(png_folder, tmp_path, capsys):
    """Unreadable images, option JSON nested too deeply, options the model does not take and
    sizes it cannot run on: each an error line naming it, never a traceback."""
    images = tmp_path / "with_broken"
    images.mkdir()
    for path in sorted(png_folder.iterdir())[:1]:
        (images / path.name).write_bytes(path.read_bytes())
    (images / "zz_broken.png").write_bytes(b"\x89PNG not really")
    common = ["--method", "dka", "--out", str(tmp_path / "erf.png"), "--num-images", "2"]
    cases = [
        (["--images", str(images), "--size", "32"], "zz_broken.png"),
        (["--images", str(png_folder), "--backbone-option", "dims=" + "[" * 100_000], "nested too deeply"),
        (["--images", str(png_folder), "--backbone-option", "no_such_option=3"], "no_such_option"),
        (["--images", str(png_folder), "--size", "1"], "--size"),
        (["--images", str(png_folder), "--batch-size", "0"], "--batch-size"),
    ]
    for arguments, named in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = main(["erf", *CLI_MODEL, *common, *arguments])
        error = capsys.readouterr().err
        assert code == 2 and named in error and "Traceback" not in error, (arguments[-1][:40], error[-500:])
