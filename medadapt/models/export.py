"""Exports of task models: TorchScript (what ``torch.jit.script``, and so MONAI's ``ckpt_export``,
makes of a Classifier, Segmenter or VolumeSegmenter), ``torch.export`` programs (``.pt2``) and
ONNX, the last two with a dynamic batch axis (:func:`export_program`, :func:`save_program`,
:func:`export_onnx`).

The encoders are third-party code (LiteMedSAM's vendored TinyViT, timm, segment_anything) and
the adapters reach the token grid through Python (layouts, cached dispatch): neither can be
compiled by TorchScript's scripting frontend. What exports is the *traced* network, and the
task models make that the default: ``torch.jit.script(model)`` calls the
``__prepare_scriptable__`` hook of :class:`ExportableModel`, which traces an export copy
(:func:`export_copy`: eval mode, no gradients, DKA's small kernels folded into its large
ones, gradient checkpointing removed, LiteMedSAM's patch merging fed maps so that the graph
takes any batch size) at the model's ``export_input_size`` and returns it
behind a scripted one-line forward (:class:`TracedNetwork`). The eager model is left as it
was. So ``python -m monai.bundle ckpt_export --net_id network_def ...`` works without
``--use_trace``; with ``--use_trace True --input_shape ...`` MONAI traces the eager model
itself (kernels unfolded, the same outputs).

A traced graph is fixed to its input size (FFT lengths, the resize to a fixed-size encoder),
not to its batch size. ``export_input_size`` is the spatial size the model is deployed at:
the bundles set it from their ``image_size`` (2D) or ``roi_size`` (3D patches), and without
it a 2D or 3D model on a fixed-size encoder (LiteMedSAM, SAM) traces at that encoder's size.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["ExportableModel", "TracedNetwork", "example_input", "export_copy", "export_onnx", "export_program",
           "match_checkpointing", "save_program", "trace_for_export"]


def export_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` to export: eval mode, parameters frozen, every Dual-Kernel Adapter's
    small kernel folded into its large one (exact), gradient checkpointing removed, TinyViT's
    patch merging fed maps (:class:`_GridTokens`). ``model`` itself is not changed."""
    from medadapt.adapters.base import replace_module
    from medadapt.adapters.dka import DualKernelAdapter
    from medadapt.memory import CheckpointedBlock

    exported = copy.deepcopy(model).eval().requires_grad_(False)
    for module in exported.modules():
        if isinstance(module, DualKernelAdapter):
            module.fold_kernels()
    checkpointed = [name for name, m in exported.named_modules() if isinstance(m, CheckpointedBlock)]
    for name in reversed(checkpointed):
        replace_module(exported, name, exported.get_submodule(name).block)
    merging = [name for name, m in exported.named_modules() if _is_tinyvit_patch_merging(m)]
    for name in merging:
        replace_module(exported, name, _GridTokens(exported.get_submodule(name)))
    return exported


def _is_tinyvit_patch_merging(module: nn.Module) -> bool:
    return type(module).__name__ == "PatchMerging" and "tiny_vit" in type(module).__module__


class _GridTokens(nn.Module):
    """TinyViT's PatchMerging (LiteMedSAM), fed a (B, C, H, W) map instead of (B, H * W, C) tokens.

    Its own reshape of tokens takes the batch size from ``len(x)``, which a trace records as a
    constant (an exported graph would then only take the traced batch size); reshaped here with
    the traced ``x.shape[0]``, the module computes the same from its 4D branch.
    """

    def __init__(self, merging: nn.Module):
        super().__init__()
        self.merging = merging

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.merging.input_resolution
            x = x.reshape(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2)
        return self.merging(x)


def _input_channels(model: nn.Module) -> int:
    stem = getattr(model, "stem", None)
    channels = getattr(stem, "in_channels", None)
    return int(channels) if channels is not None else int(model.backbone.in_channels)


def _input_size(model: nn.Module) -> tuple[int, ...]:
    size = getattr(model, "export_input_size", None)
    volume = hasattr(model, "num_slices")
    if size is None:
        fixed = getattr(model.backbone, "img_size", None)
        if fixed is None:
            raise ValueError(
                f"{type(model).__name__} on {model.backbone.name} takes any input size, so exporting it needs the "
                "size it is deployed at: build it with create_model(..., export_input_size=[...]) or set "
                "model.export_input_size (the bundles set it from image_size / roi_size)")
        if not volume:
            return fixed, fixed
        size = [fixed] * 3
        size[model.slice_axis] = model.num_slices
    size = tuple(int(s) for s in size)
    if len(size) != (3 if volume else 2):
        raise ValueError(f"export_input_size {list(size)} of a {type(model).__name__} must have "
                         f"{3 if volume else 2} spatial sizes")
    return size


def example_input(model: nn.Module, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
    """A random [0, 1] input of the shape ``model`` is exported at: (B, C, *export_input_size)."""
    reference = next(iter(model.parameters()), None)
    device = reference.device if reference is not None else None
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, _input_channels(model), *_input_size(model))
    return torch.rand(shape, generator=generator).to(device)


# How far a traced graph may be from the module it was traced from (relative, in norm) on an
# input it was not traced with: fp32 round-off, where a frozen data-dependent branch is O(1).
TRACE_CHECK_RTOL = 1e-4


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def trace_for_export(model: nn.Module, example: torch.Tensor | None = None) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of :func:`export_copy` of ``model`` at ``example`` (default:
    :func:`example_input`), checked against the copy on a second input of that shape.

    The graph is fixed at the example's spatial shape, on purpose (the tracer's warnings about
    sizes read as Python numbers are expected and silenced); the check on fresh values (two
    images in a batch) catches a branch on the data itself, which a trace would freeze.
    """
    exported = export_copy(model)
    if example is None:
        example = example_input(exported)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(exported, (example,), check_trace=False)
        probe = torch.rand((2, *example.shape[1:]), generator=torch.Generator().manual_seed(1)).to(example)
        error = _relative_error(traced(probe), exported(probe))
    if not error <= TRACE_CHECK_RTOL:
        raise RuntimeError(f"the traced {type(model).__name__} differs from the module on a new input (relative "
                           f"error {error:.2e}): its forward branches on the data, which a trace cannot record")
    return traced


# torch.export turns a dimension of size 1 into a constant: examples carry two images, so that
# the batch axis stays a variable of the program.
EXAMPLE_BATCH = 2
ONNX_OPSET = 18   # DFT (the adapters' FFTs) needs 17 or later


def export_program(model: nn.Module, example: torch.Tensor | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` of :func:`export_copy` of ``model`` at ``example`` (default: two images
    of :func:`example_input`), with the batch axis dynamic and the spatial sizes fixed, as in
    a trace. torch.export refuses code that branches on the data, so no check on a second
    input is needed."""
    exported = export_copy(model)
    if example is None:
        example = example_input(exported, batch_size=EXAMPLE_BATCH)
    with torch.no_grad():
        return torch.export.export(exported, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))


def save_program(model: nn.Module, path, extra_files: dict[str, str] | None = None) -> Path:
    """Write :func:`export_program` of ``model`` to ``path`` (``.pt2``) with ``extra_files``
    (name -> text, as MONAI's TorchScript files carry ``metadata.json``); load it with
    ``torch.export.load(path).module()``, no medadapt needed."""
    from pathlib import Path

    from medadapt.io import atomic_path

    program = export_program(model)
    with atomic_path(path) as tmp:
        torch.export.save(program, str(tmp), extra_files=dict(extra_files or {}))
    return Path(path)


def export_onnx(model: nn.Module, path, input_name: str = "image", output_name: str = "pred",
                metadata: dict[str, str] | None = None, opset_version: int = ONNX_OPSET) -> Path:
    """Write ``model`` as ONNX to ``path``: :func:`export_program` (so any batch size), its input
    and output named ``input_name`` / ``output_name`` with the batch axis called "batch", and
    ``metadata`` (key -> text) in the model's ``metadata_props``."""
    from pathlib import Path

    import onnx

    from medadapt.io import atomic_path

    program = export_program(model)
    example = tuple(program.example_inputs[0])
    onnx_program = torch.onnx.export(program, example, input_names=[input_name], output_names=[output_name],
                                     opset_version=opset_version, dynamo=True, verbose=False)
    proto = onnx_program.model_proto
    _name_batch_axis(proto.graph, "batch")
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return Path(path)


def _name_batch_axis(graph, name: str) -> None:
    """Call the batch axis ``name`` wherever the graph's shapes carry it (the exporter names it
    after its own symbol, such as "s77")."""
    symbol = graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if symbol and dim.dim_param == symbol:
                dim.dim_param = name


class TracedNetwork(nn.Module):
    """A traced task model behind a scripted ``forward`` (what ``torch.jit.script`` returns for it)."""

    def __init__(self, traced: torch.jit.ScriptModule):
        super().__init__()
        self.network = traced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


def match_checkpointing(model: nn.Module, state_dict: dict) -> dict:
    """``state_dict`` with its keys renamed to ``model``'s where the two differ only by gradient
    checkpointing (``CheckpointedBlock`` puts ``.block.`` under each encoder block it wraps),
    so a whole-network file written with checkpointing on loads into a network built without
    it, and the other way round. Any other difference is left for the strict load to report."""
    own = list(model.state_dict().keys())
    if set(own) == set(state_dict):
        return state_dict
    from medadapt.checkpoint import canonical_name
    from medadapt.families import find_encoder

    try:
        encoder_name, encoder, family = find_encoder(model)
        blocks = [f"{encoder_name}.{name}." if encoder_name else f"{name}." for name, _ in family.blocks(encoder)]
    except ValueError:
        return state_dict

    def canonical(key: str) -> str:
        for prefix in blocks:
            if key.startswith(prefix + "block."):
                return prefix + key[len(prefix) + len("block."):]
        return key

    rename = canonical_name(model)
    actual = {rename(key): key for key in own}
    renamed = {actual.get(canonical(key), key): value for key, value in state_dict.items()}
    return renamed if len(renamed) == len(state_dict) and set(renamed) == set(own) else state_dict


class ExportableModel:
    """Mixin for task models: ``torch.jit.script(model)`` gives the traced export copy, and
    whole-network state dicts load whether or not gradient checkpointing was on when they
    were written (:func:`match_checkpointing`).

    ``export_input_size`` (spatial sizes, set by ``create_model``) fixes the traced shape.
    """

    export_input_size: Sequence[int] | None = None

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this hook on a module (and on each submodule) before
        # compiling it: the traced graph replaces Python the script compiler cannot read.
        return TracedNetwork(trace_for_export(self))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict(match_checkpointing(self, state_dict), strict=strict, assign=assign)
