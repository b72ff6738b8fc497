"""medadapt: parameter-efficient adaptation of frozen foundation models to medical images.

The public API is small::

    import medadapt
    backbone = medadapt.create_backbone("litemedsam")
    model = medadapt.Classifier(backbone, num_classes=3)
    medadapt.inject(model, "dka", bottleneck=16)
    medadapt.print_trainable_parameters(model)
    medadapt.save_adapters(model, "runs/busi_dka")

Names are resolved lazily so that ``import medadapt`` stays cheap.
"""

from __future__ import annotations

import importlib

from medadapt.runtime import quiet_gpu_only_notices, tune_cpu_allocator

__version__ = "0.1.0"

tune_cpu_allocator()   # see medadapt/runtime.py: more than 2x faster CPU steps
quiet_gpu_only_notices()

_EXPORTS = {
    # adapter library and injection
    "list_methods": "medadapt.adapters",
    "method_summaries": "medadapt.adapters",
    "inject": "medadapt.injection",
    "count_parameters": "medadapt.injection",
    "print_trainable_parameters": "medadapt.models.scale",
    "trainable_summary": "medadapt.injection",
    "param_groups": "medadapt.injection",
    "disable_adapters": "medadapt.injection",
    "merge_adapters": "medadapt.injection",
    "set_stage": "medadapt.injection",
    "save_adapters": "medadapt.checkpoint",
    "load_adapters": "medadapt.checkpoint",
    # backbones and task models
    "create_backbone": "medadapt.backbones",
    "list_backbones": "medadapt.backbones",
    "Classifier": "medadapt.models",
    "Segmenter": "medadapt.models",
    "VolumeSegmenter": "medadapt.models",
    "BoxPromptSegmenter": "medadapt.models",
    "create_model": "medadapt.models",
    "load_model": "medadapt.models",
    # a bundle's inference in Python, and its networks outside medadapt
    "predict": "medadapt.engine.predict",
    "export_network": "medadapt.engine.bundle",
    # 3D interactive segmentation with a box-prompted model
    "segment_volume_from_box": "medadapt.models.box_propagation",
    "propagate_boxes": "medadapt.models.box_propagation",
    "window_volume": "medadapt.models.box_propagation",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medadapt' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return __all__
