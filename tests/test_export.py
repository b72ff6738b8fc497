"""The bundles' models exported as MONAI exports them, and compared with the bundle's own network.

``python -m monai.bundle ckpt_export`` (TorchScript) runs for every bundle with its default
settings, on the files training leaves in ``<ckpt_dir>`` (written by the training run's own
``BestModelSaver``); the exported module must equal the eager network that ``inference.json``
builds on a real demo image within 1e-4 relative. ``onnx_export`` runs for a 2D bundle and
onnxruntime must agree as well. Bundles use a tiny ConvNeXt from a weights file (so every
process builds the same backbone, as with real pretrained weights); one test exports the
default LiteMedSAM backbone.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_bundles import REPO, TINY_OPTIONS, _config, monai_bundle
from test_bundles import SMALL_DEMO as _SMALL_DEMO

from medadapt.engine.bundle import parsed
from medadapt.engine.handlers import BestModelSaver
from medadapt.models import create_model
from medadapt.models.export import match_checkpointing

BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "inference.json").is_file())
SMALL_DEMO = {bundle: eval(options) for bundle, options in _SMALL_DEMO.items()}  # noqa: S307 (a dict repr of ours)
ROI = {bundle: [32, 32, 4] for bundle in BUNDLES if "roi_size" in _config(bundle)}
RTOL = 1e-4


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def settings(bundle: str, **values) -> dict:
    values = {"image_size": 64, "demo_options": SMALL_DEMO[bundle], **values}
    if bundle in ROI:
        values["roi_size"] = ROI[bundle]
    return values


def tiny(bundle: str, checkpoint: Path) -> dict:
    return settings(bundle, backbone="timm:convnext_atto", backbone_options=TINY_OPTIONS,
                    backbone_checkpoint=str(checkpoint))


def cli(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]


def write_trained_files(bundle: str, values: dict, models: Path) -> None:
    """What training leaves in ``models``: the network train.json builds, with trained (here:
    perturbed) adapters and head, saved by the bundle's BestModelSaver on a new best epoch."""
    network = parsed(REPO / "bundles" / bundle / "train.json", "network_def", **values)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():
            if p.requires_grad:   # zero-initialised up-projections would make the adapters a no-op
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    saver = BestModelSaver(str(models), network)
    saver(SimpleNamespace(state=SimpleNamespace(metrics={"val_metric": 0.5}, key_metric_name="val_metric", epoch=1)))
    assert (models / "model.pt").is_file() and (models / "best_adapters").is_dir()


def export(command: str, bundle: str, models: Path, out: Path, values: dict, *extra: str) -> None:
    """``python -m monai.bundle COMMAND`` (ckpt_export, onnx_export) on the bundle's inference.json."""
    monai_bundle(command, "--net_id", "network_def", "--filepath", str(out), "--ckpt_file", str(models / "model.pt"),
                 "--meta_file", f"bundles/{bundle}/metadata.json", "--config_file", f"bundles/{bundle}/inference.json",
                 *cli(values), *extra)
    assert out.is_file()


def eager_network_and_image(bundle: str, values: dict, models: Path, tmp: Path):
    """The network inference.json builds, with ``models/model.pt`` loaded strictly (as its
    evaluator's CheckpointLoader loads it), and the first demo case through its preprocessing,
    as the network receives it (3D: one ROI patch)."""
    values = dict(values, demo_dir=str(tmp / "demo"), output_dir=str(tmp / "predictions"))
    config = REPO / "bundles" / bundle / "inference.json"
    network = parsed(config, "network_def", **values).eval()
    network.load_state_dict(torch.load(models / "model.pt", map_location="cpu", weights_only=True))
    image = parsed(config, "dataset", **values)[0]["image"]
    x = image.as_tensor()[None] if hasattr(image, "as_tensor") else torch.as_tensor(image)[None]
    if "roi_size" in values:
        x = x[(slice(None), slice(None), *(slice(0, r) for r in values["roi_size"]))]
        assert list(x.shape[2:]) == values["roi_size"]
    return network, x.float()


def check_exported(exported, network, x) -> float:
    with torch.no_grad():
        expected, got = network(x), exported(x)
    assert expected.std() > 0 and got.shape == expected.shape
    error = relative_error(got, expected)
    assert error < RTOL, f"exported model off by {error:.2e}"
    return error


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_ckpt_export_equals_the_bundle_network(bundle, tiny_checkpoint, tmp_path):
    values = tiny(bundle, tiny_checkpoint)
    models = tmp_path / "models"
    write_trained_files(bundle, values, models)
    out = tmp_path / "model.ts"
    export("ckpt_export", bundle, models, out, values)

    extra = {"metadata.json": "", "inference.json": ""}
    exported = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["inference.json"])["bundle_name"] == bundle
    assert "network_data_format" in json.loads(extra["metadata.json"])
    names = [name for name, _ in exported.named_parameters()]
    # DKA's small kernels are folded into the large ones: one kernel per adapter.
    assert any(n.endswith("adapter.large") for n in names) and not any(n.endswith("adapter.small") for n in names)

    network, x = eager_network_and_image(bundle, values, models, tmp_path)
    check_exported(exported, network, x)
    if x.ndim == 4:   # any batch size, not only the traced one
        with torch.no_grad():
            assert relative_error(exported(torch.cat([x, x.flip(-1)]))[1:], network(x.flip(-1))) < RTOL


@pytest.mark.slow
def test_ckpt_export_of_the_default_litemedsam_backbone(tmp_path):
    bundle = "dka_mni152_tissue"   # a slice of the real MNI152 template
    values = settings(bundle, backbone_options={"img_size": 64})
    models = tmp_path / "models"
    write_trained_files(bundle, values, models)
    out = tmp_path / "model.ts"
    export("ckpt_export", bundle, models, out, values)
    network, x = eager_network_and_image(bundle, values, models, tmp_path)
    assert network.backbone.name == "litemedsam"
    exported = torch.jit.load(str(out))
    assert "fft_rfftn" in str(exported.inlined_graph)   # the adapters' 51x51 kernels run through FFTs
    check_exported(exported, network, x)


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["dka_busi_seg", "dka_mni152_tissue_3d"])
def test_onnx_export_runs_in_onnxruntime(bundle, tiny_checkpoint, tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    # 96 pixels in 3D: 24 x 24 x 4 maps at stride 4, where the 3x51x51 kernels take the FFT path.
    size = {"image_size": 96, "roi_size": [96, 96, 4]} if bundle in ROI else {}
    values = {**tiny(bundle, tiny_checkpoint), **size}
    models = tmp_path / "models"
    write_trained_files(bundle, values, models)
    out = tmp_path / "model.onnx"
    channels = json.loads((REPO / "bundles" / bundle / "metadata.json").read_text(encoding="utf-8"))[
        "network_data_format"]["inputs"]["image"]["num_channels"]
    shape = [1, channels, *values.get("roi_size", [64, 64])]
    export("onnx_export", bundle, models, out, values, "--input_shape", json.dumps(shape),
           "--converter_kwargs", "{'opset_version': 18}")

    model = onnx.load(str(out))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert "DFT" in {node.op_type for node in model.graph.node}
    network, x = eager_network_and_image(bundle, values, models, tmp_path)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = network(x)
    assert relative_error(got, expected) < RTOL


def _batch_of_three(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.flip(-1), 0.5 * x])


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["dka_busi_cls", "dka_mni152_tissue_3d"])
def test_onnx_pt2_and_ts_exports_take_any_batch_with_named_io_and_the_bundle_metadata(bundle, tiny_checkpoint, tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from test_bundles import _as_a_user_edits_it

    from medadapt.cli import main
    from medadapt.engine.bundle import export_bundle

    values = tiny(bundle, tiny_checkpoint)
    models = tmp_path / "models"
    write_trained_files(bundle, values, models)
    zoo = export_bundle(bundle, tmp_path / "zoo", model=models / "model.pt")
    _as_a_user_edits_it(zoo, bundle)   # the tiny backbone and sizes the model was trained with
    assert main(["bundle", "export", str(zoo), str(tmp_path / "out"), "--formats", "onnx", "pt2", "ts"]) == 0
    network, x = eager_network_and_image(bundle, values, models, tmp_path)
    bundle_metadata = json.loads((REPO / "bundles" / bundle / "metadata.json").read_text(encoding="utf-8"))

    def check_metadata(text: str) -> None:
        image = json.loads(text)["network_data_format"]["inputs"]["image"]
        expected = bundle_metadata["network_data_format"]["inputs"]["image"]
        assert image["value_range"] == expected["value_range"] and image["channel_def"] == expected["channel_def"]
        assert image["num_channels"] == x.shape[1] and image["spatial_shape"] == list(x.shape[2:])

    model = onnx.load(str(tmp_path / "out" / "models" / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["pred"]
    for value in (model.graph.input[0], model.graph.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    props = {p.key: p.value for p in model.metadata_props}
    check_metadata(props["metadata.json"])
    assert json.loads(props["inference.json"])["bundle_name"] == bundle
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "models" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    extra = {"metadata.json": ""}
    program = torch.export.load(str(tmp_path / "out" / "models" / "model.pt2"), extra_files=extra).module()
    check_metadata(extra["metadata.json"])
    scripted = torch.jit.load(str(tmp_path / "out" / "models" / "model.ts"), _extra_files=extra)
    check_metadata(extra["metadata.json"])
    for batch in (x, _batch_of_three(x)):
        with torch.no_grad():
            expected = network(batch)
            assert relative_error(program(batch), expected) < RTOL and relative_error(scripted(batch), expected) < RTOL
        (got,) = session.run(["pred"], {"image": batch.numpy()})
        assert got.shape == tuple(expected.shape) and relative_error(got, expected) < RTOL


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_states_the_input_range_the_preprocessing_gives(bundle, tmp_path):
    image = json.loads((REPO / "bundles" / bundle / "metadata.json").read_text(encoding="utf-8"))[
        "network_data_format"]["inputs"]["image"]
    values = dict(settings(bundle), demo_dir=str(tmp_path / "demo"), output_dir=str(tmp_path / "predictions"))
    x = torch.as_tensor(parsed(REPO / "bundles" / bundle / "inference.json", "dataset", **values)[0]["image"]).float()
    if image["value_range"]:
        low, high = image["value_range"]
        assert float(x.min()) == pytest.approx(low, abs=1e-5) and float(x.max()) == pytest.approx(high, abs=1e-5)
    else:   # z-scores over the non-zero voxels, background 0: the metadata says so
        assert "z-score" in image["description"]
        for channel in x:
            inside = channel[channel != 0].double()
            assert float(inside.mean()) == pytest.approx(0, abs=1e-3) and float(inside.std()) == pytest.approx(1, abs=1e-2)


# ----------------------------------------------------------------------------- in process

def tiny_segmenter(task: str = "segmentation", **options):
    with torch.random.fork_rng():   # the same random backbone every time, the global generator untouched
        torch.manual_seed(0)
        with pytest.warns(UserWarning, match="NOT pretrained"):
            model = create_model(task, backbone="timm:convnext_atto", backbone_options=TINY_OPTIONS,
                                 num_classes=2, **options)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape))
    return model.eval()


@pytest.mark.parametrize("task,size", [("segmentation", [96, 96]), ("segmentation3d", [96, 96, 4])])
def test_script_gives_the_traced_export_copy_and_leaves_the_model(task, size):
    # 96 pixels: 24 x 24 maps at stride 4, where the adapters' 51x51 kernels take the FFT path.
    options = {"num_slices": 4, "in_channels": 4} if task == "segmentation3d" else {}
    model = tiny_segmenter(task, export_input_size=size, **options)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scripted = torch.jit.script(model)
    assert set(model.state_dict()) == set(before) and any(k.endswith("adapter.small") for k in before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    graph = str(scripted.inlined_graph)
    assert "fft_rfftn" in graph and "prim::PythonOp" not in graph
    x = torch.rand(3, options.get("in_channels", 3), *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(scripted(x), model(x)) < RTOL


def test_export_of_an_any_size_encoder_needs_its_input_size():
    with pytest.raises(ValueError, match="export_input_size"):
        torch.jit.script(tiny_segmenter())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_monai_trace_of_the_eager_model_also_works():
    from monai.networks.utils import convert_to_torchscript

    model = tiny_segmenter()
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    traced = convert_to_torchscript(model, use_trace=True, inputs=[x])
    assert "prim::PythonOp" not in str(traced.inlined_graph)
    with torch.no_grad():
        assert relative_error(traced(x), model(x)) < RTOL


def test_whole_network_files_load_with_or_without_gradient_checkpointing():
    plain, checkpointed = tiny_segmenter(), tiny_segmenter(gradient_checkpointing=True)
    assert set(plain.state_dict()) != set(checkpointed.state_dict())
    plain.load_state_dict(checkpointed.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), checkpointed.state_dict().values()))
    fresh = tiny_segmenter()
    checkpointed.load_state_dict(fresh.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), checkpointed.state_dict().values()))
    # Anything else is still the strict load's to refuse.
    state = fresh.state_dict()
    state.pop(next(iter(state)))
    assert match_checkpointing(plain, state) is state
    with pytest.raises(RuntimeError, match="Missing key"):
        plain.load_state_dict(state)
