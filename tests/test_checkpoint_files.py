"""Adapter folders on disk: their file names, refused loads, atomic writes, load_model."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import medadapt
from medadapt.checkpoint import (
    CONFIG_NAME,
    LEGACY_CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    read_adapter_config,
)
from medadapt.io import atomic_path, atomic_write_text, read_json_or

TINY = {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}
BACKBONE = "timm:convnext_atto"
IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """A tiny ConvNeXt's weights as a backbone checkpoint file."""
    import timm

    torch.manual_seed(0)
    source = timm.create_model("convnext_atto", pretrained=False, num_classes=0, **TINY)
    path = tmp_path_factory.mktemp("backbone") / "convnext_atto_tiny.safetensors"
    save_file(source.state_dict(), str(path))
    return path


def build(backbone_file, **options):
    arguments = {"num_classes": 3, "method": "dka", "method_options": {"bottleneck": 4}, "backbone_options": TINY,
                 **options}
    return medadapt.create_model(arguments.pop("task", "classification"), backbone=BACKBONE,
                                 backbone_checkpoint=str(backbone_file), **arguments)


def plain_model(backbone_file):
    """The same network as build() but without adapters, as a user would put it together."""
    backbone = medadapt.create_backbone(BACKBONE, checkpoint=str(backbone_file), **TINY)
    return medadapt.Classifier(backbone, num_classes=3)


def trained(model, seed=1):
    """Move every trainable weight away from its start, so a load that drops one shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def outputs(model, images=IMAGES):
    with torch.no_grad():
        return model.eval()(images)


def snapshot(model):
    """Everything a load could change: weights, module objects and types, trainability, record."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(name, type(m), id(m)) for name, m in model.named_modules()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "record": json.dumps(getattr(model, "medadapt_injection", None), sort_keys=True),
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["record"] == before["record"]
    assert after["training"] == before["training"]
    assert after["state"].keys() == before["state"].keys()
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), name


# ----------------------------------------------------------------------------- file names

def test_folder_uses_medadapt_names_and_round_trips(backbone_file, tmp_path):
    model = trained(build(backbone_file))
    folder = medadapt.save_adapters(model, tmp_path / "a")
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert (CONFIG_NAME, WEIGHTS_NAME) == ("medadapt_config.json", "medadapt_adapters.safetensors")
    fresh = plain_model(backbone_file)
    medadapt.load_adapters(fresh, folder)
    assert torch.equal(outputs(fresh), outputs(model))


def test_folders_with_the_old_peft_names_still_load_and_are_replaced_on_save(backbone_file, tmp_path):
    model = trained(build(backbone_file))
    folder = medadapt.save_adapters(model, tmp_path / "a")
    (folder / WEIGHTS_NAME).rename(folder / LEGACY_WEIGHTS_NAME)
    (folder / CONFIG_NAME).rename(folder / LEGACY_CONFIG_NAME)
    assert read_adapter_config(folder)["method"] == "dka"
    fresh = plain_model(backbone_file)
    medadapt.load_adapters(fresh, folder)
    assert torch.equal(outputs(fresh), outputs(model))
    # Saving again leaves one copy, under the current names.
    medadapt.save_adapters(fresh, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])


# ----------------------------------------------------------------------------- refused loads

def _rewrite_tensor(folder, change):
    tensors = load_file(str(folder / WEIGHTS_NAME))
    name = sorted(tensors)[0]
    tensors[name] = change(tensors[name])
    save_file(tensors, str(folder / WEIGHTS_NAME))
    return name


def _rewrite_config(folder, change):
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    change(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t.view(-1)[-1] = float("inf")
    return t


CORRUPTIONS = {
    # name: (how the folder is damaged, what the error must say besides the file's name)
    "int32 tensor": (lambda f: _rewrite_tensor(f, lambda t: t.to(torch.int32)), ["int32", "{tensor}"]),
    "NaN": (lambda f: _rewrite_tensor(f, _nan), ["NaN", "{tensor}"]),
    "Inf": (lambda f: _rewrite_tensor(f, _inf), ["Inf", "{tensor}"]),
    "no fingerprint": (lambda f: _rewrite_config(f, lambda c: c.pop("base_fingerprint")), ["base_fingerprint"]),
    "empty fingerprint": (lambda f: _rewrite_config(f, lambda c: c.update(base_fingerprint={})),
                          ["base_fingerprint", "empty"]),
    "targets not a list": (lambda f: _rewrite_config(f, lambda c: c.update(targets="stages")), ["targets"]),
    "options not a mapping": (lambda f: _rewrite_config(f, lambda c: c.update(options=[4])), ["options"]),
    "unknown version": (lambda f: _rewrite_config(f, lambda c: c.update(version=7)), ["version"]),
    "other base": (lambda f: _rewrite_config(f, lambda c: c["base_fingerprint"].update(
        {sorted(c["base_fingerprint"])[0]: "0" * 16})), ["base model differs"]),
    # The next three fail only after the method has been injected into the model.
    "bad target index": (lambda f: _rewrite_config(f, lambda c: c["options"].update(targets=[99])), ["out of range"]),
    "fewer targets": (lambda f: _rewrite_config(f, lambda c: c.update(targets=c["targets"][:-1])),
                      ["different architecture"]),
    "other bottleneck": (lambda f: _rewrite_config(f, lambda c: c["options"].update(bottleneck=8)),
                         ["shape mismatch"]),
    # Matching it against a block name would never finish (Python's re cannot be interrupted).
    "catastrophic targets pattern": (lambda f: _rewrite_config(f, lambda c: c["options"].update(
        targets="(.*.*.*.*.*)*X")), ["'targets'", "repetition inside a repetition"]),
    "config nested too deeply": (lambda f: (f / CONFIG_NAME).write_text("[" * 100_000), ["nested too deeply"]),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_refused_load_names_the_problem_and_leaves_the_model_as_it_was(backbone_file, tmp_path, corruption):
    damage, phrases = CORRUPTIONS[corruption]
    folder = medadapt.save_adapters(trained(build(backbone_file)), tmp_path / "a")
    tensor = damage(folder)
    fresh = plain_model(backbone_file)
    before = snapshot(fresh)
    with pytest.raises(ValueError) as info:
        medadapt.load_adapters(fresh, folder)
    message = str(info.value)
    assert str(folder) in message
    for phrase in phrases:
        assert phrase.format(tensor=tensor) in message, message
    assert_unchanged(fresh, before)
    # Nothing was left half-injected: a good folder still loads onto the same model.
    good = medadapt.save_adapters(trained(build(backbone_file), seed=2), tmp_path / "good")
    medadapt.load_adapters(fresh, good)


def test_a_refused_stage_two_load_restores_the_injected_model(tmp_path):
    """load_adapters raises the stage of an injected model to the folder's; a refusal lowers it back."""
    options = dict(num_classes=2, method="cladapter", method_options={"bottleneck": 8, "num_clusters": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # random backbone weights: the same seed gives the same ones
        torch.manual_seed(0)
        source = medadapt.create_model("classification", backbone=BACKBONE, backbone_options=TINY, **options)
        medadapt.set_stage(source, 2)
        folder = medadapt.save_adapters(trained(source), tmp_path / "stage2")
        torch.manual_seed(0)
        target = medadapt.create_model("classification", backbone=BACKBONE, backbone_options=TINY, **options)
    # The config is well-formed but one encoder weight is stored as integers: refused after set_stage(2).
    tensors = load_file(str(folder / WEIGHTS_NAME))
    trainable_in_stage_one = {n for n, p in target.named_parameters() if p.requires_grad}
    name = sorted(set(tensors) - trainable_in_stage_one)[0]
    good_value = tensors[name]
    tensors[name] = good_value.to(torch.int32)
    save_file(tensors, str(folder / WEIGHTS_NAME))
    before = snapshot(target)
    with pytest.raises(ValueError, match=f"wrong dtype: {name} int32"):
        medadapt.load_adapters(target, folder)
    assert_unchanged(target, before)
    assert medadapt.count_parameters(target)["trainable"] < medadapt.count_parameters(target)["total"]
    tensors[name] = good_value
    save_file(tensors, str(folder / WEIGHTS_NAME))
    medadapt.load_adapters(target, folder)
    assert torch.equal(outputs(target), outputs(source))
    assert target.medadapt_injection["stage"] == 2


def test_full_finetuning_folders_keep_their_integer_buffers(tmp_path):
    """BatchNorm's int64 counters are saved under full fine-tuning; only other integers are refused."""
    model = trained(medadapt.create_model("classification", backbone="efficientnet_lite0", num_classes=2,
                                          method="full"))
    folder = medadapt.save_adapters(model, tmp_path / "full")
    stored = load_file(str(folder / WEIGHTS_NAME))
    counters = [k for k, v in stored.items() if not v.is_floating_point()]
    assert counters and all(k.endswith("num_batches_tracked") for k in counters)
    rebuilt = medadapt.load_model(folder)   # packaged weights: no checkpoint to pass
    assert read_adapter_config(folder)["model"]["backbone_checkpoint"] is None
    assert torch.equal(outputs(rebuilt), outputs(model))
    stored[counters[0]] = stored[counters[0]].to(torch.int32)
    save_file(stored, str(folder / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=f"{counters[0]} int32 where the model has int64"):
        medadapt.load_model(folder)


# ----------------------------------------------------------------------------- load_model

def test_load_model_rebuilds_the_model_from_the_folder(backbone_file, tmp_path):
    model = trained(build(backbone_file, in_channels=4, input_mapping=(1, 2, 3)))
    folder = medadapt.save_adapters(model, tmp_path / "a")
    recorded = read_adapter_config(folder)["model"]
    assert recorded["arguments"]["backbone"] == BACKBONE
    assert recorded["arguments"]["input_mapping"] == [1, 2, 3]
    assert recorded["arguments"]["num_classes"] == 3
    assert recorded["backbone_checkpoint"]["file"] == backbone_file.name
    rebuilt = medadapt.load_model(folder, backbone_checkpoint=backbone_file, device="cpu")
    images = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(outputs(rebuilt, images), outputs(model, images))


def test_load_model_rebuilds_a_slice_stack_segmenter(backbone_file, tmp_path):
    model = trained(build(backbone_file, task="segmentation3d", num_classes=2, num_slices=2, decoder_channels=8))
    folder = medadapt.save_adapters(model, tmp_path / "a")
    rebuilt = medadapt.load_model(folder, backbone_checkpoint=backbone_file)
    volume = torch.randn(1, 3, 64, 64, 2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(outputs(rebuilt, volume), outputs(model, volume))


def test_load_model_checks_the_backbone_checkpoint(backbone_file, tmp_path):
    folder = medadapt.save_adapters(trained(build(backbone_file)), tmp_path / "a")
    with pytest.raises(ValueError, match=f"{backbone_file.name}.*pass backbone_checkpoint"):
        medadapt.load_model(folder)
    other = tmp_path / "other.safetensors"
    tensors = load_file(str(backbone_file))
    tensors["stem.0.weight"] = tensors["stem.0.weight"] + 1
    save_file(tensors, str(other))
    with pytest.raises(ValueError, match=f"other.safetensors is not the checkpoint {backbone_file.name}"):
        medadapt.load_model(folder, backbone_checkpoint=other)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        medadapt.load_model(folder, backbone_checkpoint=tmp_path / "missing.pth")


def test_load_model_refuses_a_checkpoint_for_a_model_built_without_one(tmp_path, backbone_file):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = medadapt.create_model("classification", backbone=BACKBONE, backbone_options=TINY, method="dka",
                                      method_options={"bottleneck": 4})
    folder = medadapt.save_adapters(model, tmp_path / "a")
    with pytest.raises(ValueError, match="without a backbone checkpoint"):
        medadapt.load_model(folder, backbone_checkpoint=backbone_file)


def test_load_model_explains_folders_it_cannot_rebuild(backbone_file, tmp_path):
    plain = plain_model(backbone_file)
    medadapt.inject(plain, "dka", bottleneck=4)
    folder = medadapt.save_adapters(plain, tmp_path / "plain")
    assert read_adapter_config(folder)["model"] is None
    with pytest.raises(ValueError, match="records no create_model arguments.*load_adapters"):
        medadapt.load_model(folder)
    # Arguments that are not JSON data are named when the folder is used.
    model = build(backbone_file, backbone_options={**TINY, "act_layer": torch.nn.GELU})
    folder = medadapt.save_adapters(model, tmp_path / "callable")
    with pytest.raises(ValueError, match=r"backbone_options\['act_layer'\] is a type, not JSON data"):
        medadapt.load_model(folder, backbone_checkpoint=backbone_file)


# ----------------------------------------------------------------------------- atomic writes

def test_atomic_writes_follow_the_umask_like_open(tmp_path):
    previous = os.umask(0o022)
    try:
        for mask in (0o022, 0o077, 0o002):
            os.umask(mask)
            atomic_write_text(tmp_path / f"atomic{mask:o}.txt", "x")
            with open(tmp_path / f"plain{mask:o}.txt", "w") as file:
                file.write("x")
            mode = stat.S_IMODE((tmp_path / f"atomic{mask:o}.txt").stat().st_mode)
            assert mode == stat.S_IMODE((tmp_path / f"plain{mask:o}.txt").stat().st_mode) == 0o666 & ~mask
        # Rewriting a file keeps its permissions, as open(path, "w") does.
        os.umask(0o022)
        os.chmod(tmp_path / "atomic22.txt", 0o600)
        atomic_write_text(tmp_path / "atomic22.txt", "y")
        assert stat.S_IMODE((tmp_path / "atomic22.txt").stat().st_mode) == 0o600
    finally:
        os.umask(previous)


def test_records_read_as_nothing_recorded_when_missing_torn_or_not_json(tmp_path):
    record = tmp_path / "metrics.json"
    assert read_json_or(record, {}) == {}  # missing
    record.write_text('{"run": {"seed": 0}, "val_mean_dice": 0.5')  # torn mid-write
    assert read_json_or(record, {}) == {}
    record.write_bytes(b"\xff\xfe")  # not UTF-8
    assert read_json_or(record, None) is None
    assert read_json_or(tmp_path, {}) == {}  # a folder
    record.write_text('{"run": {"seed": 0}, "val_mean_dice": 0.5}')
    assert read_json_or(record, {}) == {"run": {"seed": 0}, "val_mean_dice": 0.5}


def test_adapter_files_are_readable_by_the_group(backbone_file, tmp_path):
    previous = os.umask(0o022)
    try:
        folder = medadapt.save_adapters(build(backbone_file), tmp_path / "a")
    finally:
        os.umask(previous)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o644


SLOW_WRITER = """
import sys, time
from medadapt.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as file:
        file.write(b"0" * (1 << 20))
        file.flush()
        print(tmp, flush=True)
        while True:            # a save that never ends, until the parent kills it
            file.write(b"0" * (1 << 16))
            time.sleep(0.01)
"""

SAFETENSORS_WRITER = """
import sys, torch
from safetensors.torch import save_file
from medadapt.io import atomic_path
tensors = {"big": torch.zeros(1 << 24)}
with atomic_path(sys.argv[1]) as tmp:
    print(tmp, flush=True)
    while True:                # always in the middle of a save, until the parent kills it
        save_file(tensors, str(tmp))
"""


def _kill_during_save(script, target, ready=lambda tmp: True):
    """Run ``script`` saving ``target``; SIGKILL it once ``ready(tmp)``; return the temporary path."""
    writer = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")
    try:
        tmp = Path(writer.stdout.readline().strip())
        deadline = time.monotonic() + 60
        while not ready(tmp) and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert tmp.parent.name.startswith(f".{target.name}.tmp-{writer.pid}-")
    assert tmp.name == target.name
    return tmp


def test_a_temporary_left_by_a_killed_save_is_removed_by_the_next(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_text("the previous good file")
    tmp = _kill_during_save(SLOW_WRITER, target)
    assert tmp.stat().st_size >= 1 << 20
    assert target.read_text(encoding="utf-8") == "the previous good file"
    atomic_write_text(target, "new")
    assert target.read_text(encoding="utf-8") == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_a_safetensors_save_killed_midway_leaves_nothing_behind_after_the_next(tmp_path):
    """safetensors writes through a .tmpXXXXXX file of its own: it lies in the temporary folder too."""
    target = tmp_path / WEIGHTS_NAME
    save_file({"small": torch.ones(3)}, str(target))

    def writing(tmp):   # safetensors' own side file exists while a save is under way
        return any(p.name.startswith(".tmp") for p in tmp.parent.iterdir()) if tmp.parent.exists() else False

    tmp = _kill_during_save(SAFETENSORS_WRITER, target, ready=writing)
    assert tmp.parent.exists()
    assert torch.equal(load_file(str(target))["small"], torch.ones(3))
    with atomic_path(target) as new:
        save_file({"small": torch.zeros(3)}, str(new))
    assert torch.equal(load_file(str(target))["small"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_temporaries_of_live_writers_and_other_files_are_kept(tmp_path):
    from medadapt.io import STALE_TEMP_AGE_S, _host

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, encoding="utf-8", errors="replace", check=True)
    dead_pid = int(finished.stdout)
    target = tmp_path / "config.json"
    live = tmp_path / f".config.json.tmp-{os.getpid()}-0123abcd-{_host()}"
    dead = tmp_path / f".config.json.tmp-{dead_pid}-0123abcd-{_host()}"
    other_target = tmp_path / f".other.json.tmp-{dead_pid}-0123abcd-{_host()}"
    other_host = tmp_path / f".config.json.tmp-{dead_pid}-0123abcd-somewhere_else"
    abandoned = tmp_path / f".config.json.tmp-{os.getpid()}-4567cdef-{_host()}"
    for folder in (live, dead, other_target, other_host, abandoned):
        folder.mkdir()
        (folder / "config.json").write_text("partial")
    old = time.time() - STALE_TEMP_AGE_S - 60
    os.utime(abandoned, (old, old))
    atomic_write_text(target, "{}")
    assert live.exists() and other_target.exists() and other_host.exists()
    assert not dead.exists() and not abandoned.exists()

    # A resumed run sweeps its whole folder: dead writers' temporaries of any file, at any depth.
    from medadapt.io import remove_stale_temporaries_under

    nested = tmp_path / "adapters" / f".weights.bin.tmp-{dead_pid}-89abcdef-{_host()}"
    nested.mkdir(parents=True)
    hidden_file = tmp_path / ".notes"
    hidden_file.write_text("not a temporary")
    removed = remove_stale_temporaries_under(tmp_path)
    assert sorted(removed) == sorted([other_target, nested])
    assert live.exists() and other_host.exists() and hidden_file.exists() and target.exists()


def test_a_failed_write_leaves_neither_temporary_nor_target(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []
