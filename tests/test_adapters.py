"""Every method on every backbone family it supports, through the real injection path."""

from __future__ import annotations

import copy

import pytest
import torch

import medadapt
from medadapt.adapters import METHODS
from medadapt.adapters.cli import supported_families
from medadapt.injection import injection_record

from conftest import ENCODERS, build_task

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
        # DKA: projections without bias plus both kernels.
        ("dka", 16, 9): 2 * blocks * (2 * d * 16 + 16 * (9 * 9 + 5 * 5)),
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

    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="missing") as info:
        medadapt.load_adapters(build_task("timm_vit", seed=0)[0], tmp_path / "a")
    assert dropped in str(info.value)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        medadapt.load_adapters(build_task("timm_vit")[0], tmp_path / "missing")


def test_adapter_file_is_small(tmp_path):
    model, _ = build_task("sam_vit")
    medadapt.inject(model, "adapter")
    folder = medadapt.save_adapters(model, tmp_path / "a")
    size = (folder / "adapter_model.safetensors").stat().st_size
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
    full = medadapt.save_adapters(model, tmp_path / "fp32") / "adapter_model.safetensors"
    half = medadapt.save_adapters(model, tmp_path / "fp16", dtype="float16") / "adapter_model.safetensors"
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
