"""Every method on every backbone family it supports, through the real injection path."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ENCODERS, TinyTask, build_task

import medadapt
from medadapt.adapters import METHODS, make_config
from medadapt.adapters.base import TokenLayout
from medadapt.adapters.cli import supported_families
from medadapt.adapters.wrappers import Adapted
from medadapt.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from medadapt.injection import injection_record

# TinyViT needs a 256 input; it runs the methods whose code paths differ there.
TINYVIT_METHODS = {"dka", "lka", "lora", "cladapter", "bitfit", "adapter"}

SUPPORTED = [(f, m) for f in ENCODERS for m in METHODS
             if f in supported_families(m) and (f != "tinyvit" or m in TINYVIT_METHODS)]
UNSUPPORTED = [(f, m) for f in ENCODERS for m in METHODS if f not in supported_families(m)]


def _train_step(model, x):
    model.train()
    groups = medadapt.param_groups(model, lr_adapter=1e-2, lr_head=1e-2)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.1)
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.parametrize("family,method", SUPPORTED, ids=[f"{f}-{m}" for f, m in SUPPORTED])
def test_method_on_family(family, method, tmp_path):
    model, x = build_task(family)
    untouched = copy.deepcopy(model).eval()
    with torch.no_grad():
        reference = untouched(x)

    medadapt.inject(model, method)
    model.eval()
    with torch.no_grad():
        injected = model(x)
    assert injected.shape == reference.shape
    if METHODS[method].identity_at_init:
        torch.testing.assert_close(injected, reference, rtol=0, atol=1e-5)
    else:
        assert not torch.allclose(injected, reference, atol=1e-6), "a non-identity method changed nothing"

    # Only adapters and the head learn; the frozen encoder is bit-identical after a step.
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "nothing to train"
    _train_step(model, x)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} is trainable but received no gradient"
        else:
            assert p.grad is None, f"frozen {n} received a gradient"
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    if method != "full":
        encoder_prefix = injection_record(model)["encoder"] + "."
        head = [n for n in trainable if not n.startswith(encoder_prefix)]
        assert head == ["head.weight", "head.bias"]

    # Save -> load onto a freshly built base reproduces the outputs exactly.
    model.eval()
    with torch.no_grad():
        trained = model(x)
    medadapt.save_adapters(model, tmp_path / "adapters")
    fresh, _ = build_task(family)
    medadapt.load_adapters(fresh, tmp_path / "adapters")
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained, rtol=0, atol=0)


@pytest.mark.parametrize("family,method", UNSUPPORTED, ids=[f"{f}-{m}" for f, m in UNSUPPORTED])
def test_unsupported_combination_names_method_and_backbone(family, method):
    model, _ = build_task(family)
    with pytest.raises(ValueError) as info:
        medadapt.inject(model, method)
    assert method in str(info.value) and family in str(info.value)


def test_list_methods_has_every_paper_method():
    assert set(medadapt.list_methods()) == {
        "dka", "lka", "cladapter", "adapter", "adaptformer", "convpass", "lora", "bitfit", "vpt",
        "ciat", "aim", "linear", "full"}


def test_unknown_method_and_option_are_named():
    model, _ = build_task("timm_vit")
    with pytest.raises(ValueError, match="'nope'"):
        medadapt.inject(model, "nope")
    with pytest.raises(ValueError, match="bottlenek"):
        medadapt.inject(model, "dka", bottlenek=8)
    with pytest.raises(ValueError, match="placement"):
        medadapt.inject(model, "dka", placement="sideways")


@pytest.mark.parametrize("options, message", [
    ({"bottleneck": "8"}, "'bottleneck' takes a whole number or null, got '8'"),
    ({"bottleneck": True}, "'bottleneck' takes a whole number"),
    ({"dropout": None}, "'dropout' takes a number"),
    ({"large_kernel": [1, "51", 51]}, "'large_kernel' takes a whole number or a list"),
    ({"targets": {"a": 1}}, "'targets' takes a list of (a whole number) or a string or null"),
])
def test_option_values_of_the_wrong_type_are_refused_naming_the_option(options, message):
    with pytest.raises(ValueError) as error:
        medadapt.adapters.make_config("dka", options)
    assert message in str(error.value)
    # what the fields take is accepted, tuples for lists included
    config = medadapt.adapters.make_config("dka", {"bottleneck": 8, "dropout": 0, "large_kernel": (1, 51, 51),
                                                   "targets": [0, -1]})
    assert config.large_kernel == (1, 51, 51) and config.targets == [0, -1]


def test_inject_twice_is_refused():
    model, _ = build_task("timm_vit")
    medadapt.inject(model, "lora")
    with pytest.raises(ValueError, match="already has 'lora'"):
        medadapt.inject(model, "dka")


def _adapter_count(model):
    counts = medadapt.count_parameters(model)
    return counts["trainable"] - sum(p.numel() for p in model.head.parameters())


def test_parameter_counts_match_closed_forms():
    d, blocks = 32, 2  # tiny ViT width and depth
    cases = {
        # LKA: 2 d d^ + d^ k^2 + biases (d^ + d), two modules per block (parallel to MSA and MLP).
        ("lka", 8, 7): 2 * blocks * (2 * d * 8 + 8 * 7 * 7 + 8 + d),
        # DKA: projections without bias plus both kernels, one module after each block.
        ("dka", 16, 9): blocks * (2 * d * 16 + 16 * (9 * 9 + 5 * 5)),
        # Houlsby: 2 d d^ + d^ + d, after attention and after the MLP.
        ("adapter", 4, None): 2 * blocks * (2 * d * 4 + 4 + d),
    }
    for (method, bottleneck, kernel), expected in cases.items():
        model, _ = build_task("timm_vit")
        options = {"bottleneck": bottleneck}
        if method == "lka":
            options["kernel_size"] = kernel
        if method == "dka":
            options["large_kernel"] = kernel
        medadapt.inject(model, method, **options)
        assert _adapter_count(model) == expected, method
    model, _ = build_task("timm_vit")
    medadapt.inject(model, "lora", rank=4)
    assert _adapter_count(model) == blocks * 4 * (d + 3 * d)  # qkv: in d, out 3d


def test_targets_by_index_and_regex():
    model, _ = build_task("timm_swin")
    medadapt.inject(model, "lka", targets=[0, -1], kernel_size=3)
    assert injection_record(model)["targets"] == [
        "layers.0.blocks.0.attn", "layers.0.blocks.0.mlp", "layers.1.blocks.1.attn", "layers.1.blocks.1.mlp"]
    model, _ = build_task("timm_swin")
    medadapt.inject(model, "adapter", targets=r"^layers\.1\.")
    assert all(t.startswith("layers.1.") for t in injection_record(model)["targets"])
    model, _ = build_task("timm_swin")
    with pytest.raises(ValueError, match="out of range"):
        medadapt.inject(model, "dka", targets=[7])
    with pytest.raises(ValueError, match="select no block"):
        medadapt.inject(build_task("timm_swin")[0], "dka", targets="nothing-matches")


def test_placements_wrap_the_documented_sublayers():
    for placement, expected in {
        "parallel": ["blocks.0.attn", "blocks.0.mlp"],
        "sequential": ["blocks.0.attn", "blocks.0.mlp"],
        "block": ["blocks.0"],
    }.items():
        model, x = build_task("sam_vit")
        medadapt.inject(model, "lka", targets=[0], placement=placement, kernel_size=3)
        assert injection_record(model)["targets"] == expected
        wrapper = model.encoder.get_submodule(expected[0])
        assert wrapper.mode == ("parallel" if placement == "parallel" else "sequential")
    # CNN blocks default to whole-block adapters; parallel on a reshaping block is refused.
    model, _ = build_task("resnet")
    medadapt.inject(model, "dka")
    assert injection_record(model)["targets"][0] == "layer1.0"
    with pytest.raises(ValueError, match="keep their shape"):
        medadapt.inject(build_task("resnet")[0], "dka", placement="parallel")


def _randomise_adapters(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith("head."):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def test_disable_adapters_recovers_the_pretrained_model():
    model, x = build_task("sam_vit")
    untouched = copy.deepcopy(model).eval()
    medadapt.inject(model, "dka", large_kernel=7)
    _randomise_adapters(model)
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        with medadapt.disable_adapters(model):
            plain = model(x)
        again = model(x)
    assert not torch.allclose(adapted, plain)
    torch.testing.assert_close(plain, untouched(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)
    bitfit, _ = build_task("sam_vit")
    medadapt.inject(bitfit, "bitfit")
    with pytest.raises(ValueError, match="no adapter to disable"):
        with medadapt.disable_adapters(bitfit):
            pass


def test_merge_lora_and_dka_keep_outputs():
    for method, options in {"lora": {}, "dka": {"large_kernel": 9}}.items():
        model, x = build_task("timm_vit")
        medadapt.inject(model, method, **options)
        _randomise_adapters(model)
        model.eval()
        with torch.no_grad():
            before = model(x)
            medadapt.merge_adapters(model)
            after = model(x)
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    from medadapt.adapters.lora import LoRALinear

    assert not any(isinstance(m, LoRALinear) for m in model.modules()) or method != "lora"
    model, _ = build_task("timm_vit")
    medadapt.inject(model, "adapter")
    with pytest.raises(ValueError, match="cannot be merged"):
        medadapt.merge_adapters(model)


def test_lora_merge_removes_wrappers():
    from medadapt.adapters.lora import LoRALinear

    model, _ = build_task("timm_vit")
    medadapt.inject(model, "lora")
    medadapt.merge_adapters(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with pytest.raises(ValueError, match="merged"):
        medadapt.save_adapters(model, "unused")


def test_param_groups_separate_learning_rates():
    model, _ = build_task("timm_vit")
    medadapt.inject(model, "dka")
    groups = {g["name"]: g for g in medadapt.param_groups(model, lr_adapter=1e-3, lr_head=1e-4)}
    assert set(groups) == {"adapter", "head"}
    assert groups["adapter"]["lr"] == 1e-3 and groups["head"]["lr"] == 1e-4
    assert sum(p.numel() for p in groups["head"]["params"]) == sum(p.numel() for p in model.head.parameters())
    bitfit, _ = build_task("timm_vit")
    medadapt.inject(bitfit, "bitfit")
    names = {g["name"] for g in medadapt.param_groups(bitfit)}
    assert names == {"adapter", "head"}


def test_staged_finetuning_unfreezes_the_encoder_in_stage_two():
    model, x = build_task("timm_convnext")
    medadapt.inject(model, "cladapter", bottleneck=16, num_clusters=4)
    frozen_before = medadapt.count_parameters(model)
    medadapt.set_stage(model, 2)
    counts = medadapt.count_parameters(model)
    assert counts["trainable"] == counts["total"] > frozen_before["trainable"]
    groups = {g["name"] for g in medadapt.param_groups(model, lr_adapter=1e-4, lr_head=1e-4, lr_backbone=1e-5)}
    assert groups == {"adapter", "head", "backbone"}
    medadapt.set_stage(model, 1)
    assert medadapt.count_parameters(model)["trainable"] == frozen_before["trainable"]


def test_frozen_batchnorm_keeps_running_stats_in_train_mode():
    model, x = build_task("resnet")
    medadapt.inject(model, "adapter")
    bn = model.encoder.bn1
    stats = bn.running_mean.clone()
    model.train()
    model(x * 5 + 3)
    assert not bn.training
    assert torch.equal(bn.running_mean, stats)
    full, _ = build_task("resnet")
    medadapt.inject(full, "full")
    full.train()
    full(x * 5 + 3)
    assert not torch.equal(full.encoder.bn1.running_mean, stats)


def test_vpt_deep_and_shallow():
    for deep in (True, False):
        model, x = build_task("timm_vit")
        medadapt.inject(model, "vpt", num_tokens=3, deep=deep)
        out = model(x)
        out.sum().backward()
        prompts = [p for n, p in model.named_parameters() if n.endswith("prompts")]
        assert len(prompts) == (2 if deep else 1)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompts)


def test_load_refuses_a_different_base_and_lists_keys(tmp_path):
    model, x = build_task("timm_vit", seed=0)
    medadapt.inject(model, "lora")
    medadapt.save_adapters(model, tmp_path / "a")
    other, _ = build_task("timm_vit", seed=1)
    with pytest.raises(ValueError, match="base model differs") as info:
        medadapt.load_adapters(other, tmp_path / "a")
    assert "blocks.0" in str(info.value)
    # A weights file missing a tensor is refused, naming it.
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(tmp_path / "a" / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="does not hold the tensors its config lists") as info:
        medadapt.load_adapters(build_task("timm_vit", seed=0)[0], tmp_path / "a")
    assert dropped in str(info.value)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        medadapt.load_adapters(build_task("timm_vit")[0], tmp_path / "missing")


def test_adapter_file_is_small(tmp_path):
    model, _ = build_task("sam_vit")
    medadapt.inject(model, "adapter")
    folder = medadapt.save_adapters(model, tmp_path / "a")
    size = (folder / WEIGHTS_NAME).stat().st_size
    trainable = medadapt.count_parameters(model)["trainable"]
    assert size < 4 * trainable + 4096


def test_adapters_stored_in_half_precision(tmp_path):
    model, x = build_task("sam_vit")
    medadapt.inject(model, "dka", bottleneck=4)
    torch.manual_seed(1)
    with torch.no_grad():   # move the adapters away from their identity start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    full = medadapt.save_adapters(model, tmp_path / "fp32") / WEIGHTS_NAME
    half = medadapt.save_adapters(model, tmp_path / "fp16", dtype="float16") / WEIGHTS_NAME
    assert half.stat().st_size < 0.55 * full.stat().st_size
    fresh, _ = build_task("sam_vit")
    medadapt.load_adapters(fresh, tmp_path / "fp16")
    assert all(p.dtype == torch.float32 for p in fresh.parameters())
    model.eval(), fresh.eval()
    with torch.no_grad():
        expected, got = model(x), fresh(x)
    assert not torch.equal(expected, got)
    assert torch.allclose(expected, got, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    with pytest.raises(ValueError, match="dtype must be one of"):
        medadapt.save_adapters(model, tmp_path / "bad", dtype="int8")
    assert not (tmp_path / "bad").exists()


def test_trainable_summary_reads_like_peft(capsys):
    model, _ = build_task("timm_vit")
    medadapt.inject(model, "lka")
    medadapt.print_trainable_parameters(model)
    out = capsys.readouterr().out
    counts = medadapt.count_parameters(model)
    assert f"trainable params: {counts['trainable']:,}" in out and "method: lka" in out


def test_methods_command_lists_every_method(capsys):
    from medadapt.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"\n{name} " in "\n" + out


def test_cladapter_on_a_vit_feeds_the_class_token_pool_its_mean_of_patch_tokens():
    # The paper drops the class token and mean-pools CLAdapter's patch tokens; a classifier
    # reading the class token reads exactly that.
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = medadapt.create_backbone("timm:vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                                            depth=2, num_heads=2)
    model = medadapt.Classifier(backbone, num_classes=3).eval()
    assert model.pool == "cls"
    medadapt.inject(model, "cladapter", bottleneck=8, num_clusters=3)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        patches = model.backbone(model.backbone.preprocess(x)).flatten(2).mean(-1)
        torch.testing.assert_close(model(x), model.head(patches))
        with medadapt.disable_adapters(model):
            plain = model(x)
    assert not torch.allclose(model(x), plain)


def test_methods_command_names_the_prompt_families():
    # VPT runs on MedSAM's ViT and on CNNs (the DKA paper's "Prompt" rows), not only on timm ViTs.
    assert {"sam_vit", "timm_vit", "resnet", "timm_convnext", "efficientnet"} <= set(supported_families("vpt"))
    assert "resnet" not in supported_families("lora")


# ----------------------------------------------------------------------------- the papers' placements

def _task(encoder, size=64):
    model = TinyTask(encoder)
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))  # materialise the lazy head
    return model


def _resnet(layers):
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    encoder = ResNet(Bottleneck, layers)
    encoder.fc = nn.Identity()
    return _task(encoder)


def _efficientnet_classifier():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return medadapt.Classifier(medadapt.create_backbone("efficientnet_lite0"), num_classes=2)


def test_dka_goes_after_each_transformer_block_and_each_cnn_stage():
    # The reference code puts one DKA on the output of every transformer block.
    for family in ("timm_vit", "sam_vit"):
        model, x = build_task(family)
        medadapt.inject(model, "dka", large_kernel=3)
        assert injection_record(model)["targets"] == ["blocks.0", "blocks.1"]
        assert {model.encoder.get_submodule(n).mode for n in injection_record(model)["targets"]} == {"sequential"}
    model, _ = build_task("timm_vit")
    medadapt.inject(model, "dka", large_kernel=3, placement="parallel")
    assert injection_record(model)["targets"] == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    # On CNNs, one on the output of every residual stage: the last block of each.
    resnet = _resnet([2, 2, 1, 1])
    medadapt.inject(resnet, "dka", large_kernel=3)
    assert injection_record(resnet)["targets"] == ["layer1.1", "layer2.1", "layer3.0", "layer4.0"]
    import timm

    torch.manual_seed(0)
    convnext = _task(timm.create_model("convnext_atto", pretrained=False, num_classes=0, depths=(2, 1, 1, 2),
                                       dims=(8, 16, 24, 32)))
    medadapt.inject(convnext, "dka", large_kernel=3)
    assert injection_record(convnext)["targets"] == [
        "stages.0.blocks.1", "stages.1.blocks.0", "stages.2.blocks.0", "stages.3.blocks.1"]
    # EfficientNet-Lite0 has no stage modules: its stages are runs of MBConv blocks of one
    # width (16, 24, 40, 80, 112, 192, 320 channels in 1, 2, 2, 3, 3, 4, 1 blocks).
    efficientnet = _efficientnet_classifier()
    medadapt.inject(efficientnet, "dka", large_kernel=3)
    assert injection_record(efficientnet)["targets"] == [f"_blocks.{i}" for i in (0, 2, 4, 7, 10, 14, 15)]
    efficientnet.eval()(torch.rand(1, 3, 64, 64))
    # Whole-block placements stay per block; other methods keep their own defaults.
    per_block = _resnet([2, 2, 1, 1])
    medadapt.inject(per_block, "dka", large_kernel=3, placement="block")
    assert len(injection_record(per_block)["targets"]) == 6
    houlsby = _resnet([2, 2, 1, 1])
    medadapt.inject(houlsby, "adapter")
    assert len(injection_record(houlsby)["targets"]) == 6


def test_the_record_holds_the_placement_as_built():
    # A saved folder rebuilds the same adapters even if a method's default placement changes.
    for family, method, placement in (("timm_vit", "dka", "block"), ("resnet", "dka", "stage"),
                                      ("timm_vit", "lka", "parallel"), ("timm_vit", "adapter", "sequential"),
                                      ("timm_vit", "aim", "aim")):
        model, _ = build_task(family)
        medadapt.inject(model, method)
        assert injection_record(model)["options"]["placement"] == placement, (family, method)


@pytest.mark.parametrize("family", ["tinyvit", "sam_vit", "timm_vit"])
def test_parallel_adapters_see_the_sublayers_normalised_input(family):
    # TinyViT's Attention and Mlp apply their own LayerNorm ("norm") to the raw residual
    # stream; SAM's and timm's blocks normalise before calling them.
    model, x = build_task(family)
    medadapt.inject(model, "lka", kernel_size=3)  # parallel beside attention and MLP
    wrappers = {n: m for n, m in model.encoder.named_modules() if isinstance(m, Adapted) and m.mode == "parallel"}
    assert len(wrappers) >= 4
    seen, normalised, hooks = {}, {}, []
    for name, wrapper in wrappers.items():
        hooks.append(wrapper.adapter.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0])))
        if family == "tinyvit":
            norm = wrapper.base.norm
            hooks.append(norm.register_forward_hook(lambda m, a, out, name=name: normalised.setdefault(name, out)))
        else:
            hooks.append(wrapper.base.register_forward_pre_hook(lambda m, a, name=name: normalised.setdefault(name, a[0])))
    model.eval()
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    for name in wrappers:
        torch.testing.assert_close(seen[name], normalised[name], rtol=0, atol=0, msg=name)


def test_parallel_adapters_bypass_the_blocks_layer_scale():
    import timm

    torch.manual_seed(0)
    encoder = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                                depth=1, embed_dim=32, num_heads=2, init_values=1e-2)
    original = copy.deepcopy(encoder.blocks[0]).eval()
    model = _task(encoder, size=32)
    medadapt.inject(model, "lka", kernel_size=3)
    _randomise_adapters(model)
    block = model.encoder.blocks[0].eval()
    a1, a2 = block.attn.adapter, block.mlp.adapter
    tokens = torch.randn(2, 1 + 16, 32)
    with torch.no_grad():
        # x + ls1(MSA(LN x)) + A1(LN x), then the same with ls2, MLP and A2: the LayerScale
        # multiplies the pretrained sub-layer only, never the adapter beside it.
        h = tokens + original.ls1(original.attn(original.norm1(tokens))) + a1(original.norm1(tokens))
        expected = h + original.ls2(original.mlp(original.norm2(h))) + a2(original.norm2(h))
        torch.testing.assert_close(block(tokens), expected, rtol=1e-5, atol=1e-6)
        with medadapt.disable_adapters(model):
            torch.testing.assert_close(block(tokens), original(tokens), rtol=0, atol=0)


def test_cladapter_temperature_is_an_option_defaulting_to_one():
    from medadapt.adapters.cladapter import ClusterAttention

    assert make_config("cladapter", {}).temperature == 1.0
    for temperature in (1.0, 0.25):
        model, _ = build_task("timm_convnext")
        medadapt.inject(model, "cladapter", bottleneck=8, num_clusters=3, temperature=temperature)
        attention = next(m for m in model.modules() if isinstance(m, ClusterAttention))
        tokens = torch.randn(2, 5, attention.centres.shape[1])
        similarity = F.normalize(tokens.mean(dim=1), dim=-1) @ F.normalize(attention.centres, dim=-1).t()
        torch.testing.assert_close(attention.cluster_weights(tokens), torch.softmax(similarity / temperature, dim=-1))
    with pytest.raises(ValueError, match="temperature"):
        medadapt.inject(build_task("timm_convnext")[0], "cladapter", temperature=0.0)


def test_cladapter_on_efficientnet_adapts_the_final_map_right_before_the_head():
    model = _efficientnet_classifier().eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        final = model.backbone(model.backbone.preprocess(x))   # act(bn1(conv_head(...)))
    medadapt.inject(model, "cladapter", bottleneck=8, num_clusters=3)
    assert injection_record(model)["targets"] == ["final_features"]
    wrapper = model.backbone.encoder.final_features
    seen = {}
    wrapper.adapter.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        out = model(x)
    assert seen["x"].shape[1] == 1280 == model.backbone.out_channels
    torch.testing.assert_close(seen["x"], final, rtol=0, atol=0)
    assert out.shape == (1, 2)


# ----------------------------------------------------------------------------- prompts

TINY_MEDSAM = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=2)


def test_vpt_on_medsam_prompts_every_blocks_windowed_and_global_attention():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = medadapt.Classifier(medadapt.create_backbone("medsam_vit_b", **TINY_MEDSAM), num_classes=3)
    untouched = copy.deepcopy(model).eval()
    x = torch.rand(2, 3, 64, 64)
    medadapt.inject(model, "vpt", num_tokens=4)
    assert injection_record(model)["targets"] == ["blocks.0.attn", "blocks.1.attn"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["backbone.encoder.blocks.0.attn.prompts", "backbone.encoder.blocks.1.attn.prompts",
                         "head.1.weight", "head.1.bias"]
    model.train()
    out = model(x)
    assert out.shape == (2, 3)
    out.square().sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x), untouched(x))
        with medadapt.disable_adapters(model):
            torch.testing.assert_close(model(x), untouched(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="deep=True"):
        medadapt.inject(copy.deepcopy(untouched), "vpt", deep=False)


def test_prompted_attention_is_attention_over_the_tokens_and_the_normalised_prompts():
    from segment_anything.modeling.image_encoder import Attention

    from medadapt.adapters.vpt import PromptedAttention

    torch.manual_seed(0)
    attention = Attention(dim=16, num_heads=2, use_rel_pos=False)
    norm = nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.normal_()
    prompts = nn.Parameter(torch.randn(3, 16))
    windows = torch.randn(6, 2, 2, 16)   # six 2x2 attention windows
    # Without position terms attention treats its tokens as a set, so a one-row "image" of a
    # window's tokens followed by the normalised prompts is the reference.
    row = torch.cat([windows.reshape(6, 1, 4, 16), norm(prompts).expand(6, 1, 3, 16)], dim=2)
    expected = attention(row)[:, :, :4].reshape(6, 2, 2, 16)
    torch.testing.assert_close(PromptedAttention(attention, prompts, norm)(windows), expected, rtol=1e-5, atol=1e-6)


def test_vpt_prompt_init_counts_the_input_channels_once():
    # VPT: uniform in +-sqrt(6 / (3 * 16 * 16 + dim)) for 3-channel 16x16 patches.
    model, _ = build_task("timm_vit")
    medadapt.inject(model, "vpt", num_tokens=200)
    bound = math.sqrt(6.0 / (3 * 16 * 16 + 32))
    prompts = [p for n, p in model.named_parameters() if n.endswith("prompts")]
    assert prompts
    for p in prompts:
        assert 0.95 * bound < float(p.detach().abs().max()) <= bound


def test_vpt_on_cnns_is_a_pixel_frame_added_at_the_stem():
    model, x = build_task("resnet")
    untouched = copy.deepcopy(model).eval()
    medadapt.inject(model, "vpt", num_tokens=4, pixel_grid=32)
    assert injection_record(model)["targets"] == ["conv1"]
    prompt = model.encoder.conv1.adapter
    # A frame 4 pixels wide on a 32-pixel grid: C * (4 w S - 4 w^2) parameters.
    assert _adapter_count(model) == 3 * (4 * 4 * 32 - 4 * 4 * 4)
    frame = prompt(x)
    assert frame.shape == (1, 3, 64, 64)
    assert not frame[..., 10:54, 10:54].any() and frame[..., :6, :].abs().min() > 0
    model.eval()
    with torch.no_grad():
        assert model(x).shape == untouched(x).shape
        torch.testing.assert_close(model.encoder.conv1.base(x + frame), model.encoder.conv1(x))
        with medadapt.disable_adapters(model):
            torch.testing.assert_close(model(x), untouched(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="targets do not apply"):
        medadapt.inject(build_task("resnet")[0], "vpt", targets=[0])


# ----------------------------------------------------------------------------- docstrings kept true

def test_convpass_convolves_prefix_tokens_as_one_pixel_images():
    from medadapt.adapters.convpass import ConvBypass

    torch.manual_seed(0)
    adapter = ConvBypass(8, TokenLayout("sequence", grid=(3, 4), num_prefix=2), bottleneck=4).eval()
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
        x = torch.randn(2, 2 + 12, 8)
        h = adapter.act(adapter.down(x))
        # As Convpass convolves its class token: each prefix token is a 1x1 image.
        prefix = adapter.conv(h[:, :2].reshape(4, 4, 1, 1)).reshape(2, 2, 4)
        patches = adapter.conv(h[:, 2:].reshape(2, 3, 4, 4).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(2, 12, 4)
        expected = adapter.up(adapter.act(torch.cat([prefix, patches], dim=1)))
        torch.testing.assert_close(adapter(x), expected, rtol=1e-5, atol=1e-5)


def test_aim_bottleneck_is_a_quarter_of_the_width_by_default():
    for options, width in (({}, 32 // 4), ({"bottleneck": 16}, 16)):
        model, _ = build_task("timm_vit")   # 32 channels
        medadapt.inject(model, "aim", **options)
        downs = {m.adapter.down.out_features for m in model.modules() if isinstance(m, Adapted)}
        assert downs == {width}


# ----------------------------------------------------------------------------- lifecycle

SIZE_OPTIONS = {"dka": "bottleneck", "lka": "bottleneck", "cladapter": "bottleneck", "adapter": "bottleneck",
                "adaptformer": "bottleneck", "convpass": "bottleneck", "lora": "rank", "bitfit": None,
                "vpt": "num_tokens", "ciat": "bottleneck", "aim": "bottleneck", "linear": None, "full": None}


def test_every_config_declares_its_size_option():
    assert {name: config.size_option for name, config in METHODS.items()} == SIZE_OPTIONS
    for name, config in METHODS.items():
        if config.size_option is not None:
            assert config.size_option in {f.name for f in dataclasses.fields(config)}, name
    # The size option is what moves the method's trainable-parameter count.
    for method, sizes in {"dka": (4, 8), "lora": (2, 4), "vpt": (2, 4)}.items():
        counts = []
        for size in sizes:
            model, _ = build_task("timm_vit")
            medadapt.inject(model, method, **{METHODS[method].size_option: size})
            counts.append(_adapter_count(model))
        assert counts[0] < counts[1], method


def test_every_config_declares_its_stages():
    for name in METHODS:
        config = make_config(name, {})
        trains = [config.stage_trains(stage) for stage in range(1, config.num_stages + 1)]
        fixed = [config.encoder_output_fixed(stage) for stage in range(1, config.num_stages + 1)]
        expected = {
            "cladapter": ([{"adapter", "head"}, {"adapter", "head", "encoder"}], [True, False]),
            "linear": ([{"head"}], [True]),
            "full": ([{"encoder", "head"}], [False]),
        }.get(name, ([{"adapter", "head"}], [False]))
        assert (trains, fixed) == expected, name
        with pytest.raises(ValueError, match="training stage"):
            config.stage_trains(config.num_stages + 1)
    model, _ = build_task("timm_vit")
    medadapt.inject(model, "dka")
    before = medadapt.count_parameters(model)
    with pytest.raises(ValueError, match="dka: this method has 1 training stage"):
        medadapt.set_stage(model, 2)
    assert medadapt.count_parameters(model) == before
    assert medadapt.injection.encoder_output_fixed(model) is False


def test_a_new_method_is_its_config_and_a_registry_line(monkeypatch):
    """Nothing outside a method's own file knows its name: a config subclass registered under a
    new name merges, switches off and groups its parameters like the original."""
    from medadapt.adapters.lora import LoRAConfig, LoRALinear

    @dataclasses.dataclass
    class LowRankConfig(LoRAConfig):
        pass

    monkeypatch.setitem(METHODS, "low_rank", LowRankConfig)
    model, x = build_task("timm_vit")
    untouched = copy.deepcopy(model).eval()
    medadapt.inject(model, "low_rank", rank=2)
    _randomise_adapters(model)
    model.eval()
    groups = {g["name"]: g for g in medadapt.param_groups(model)}
    assert sum(p.numel() for p in groups["adapter"]["params"]) == 2 * 2 * (32 + 3 * 32)
    with torch.no_grad():
        adapted = model(x)
        with medadapt.disable_adapters(model):
            torch.testing.assert_close(model(x), untouched(x), rtol=0, atol=0)
        medadapt.merge_adapters(model)
        torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize("method, options", [("dka", {"targets": "(.*.*.*.*.*)*X"}),
                                             ("lora", {"target_modules": "(a|aa)+b"})])
def test_patterns_that_could_hang_are_refused_when_the_config_is_made(method, options):
    import time

    model, _ = build_task("timm_vit")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="the pattern is a"):
        medadapt.inject(model, method, **options)
    assert time.perf_counter() - start < 5  # refused from the pattern itself, not after matching
