"""Write each bundle's MONAI configs from the shared recipes, its dataset preset and its own settings.

    python bundles/build.py            # rewrite every bundle's configs
    python bundles/build.py --check    # exit 1, naming the files, if a written config is stale

A bundle folder holds ``bundle.json``: its dataset (``dataset_name``, ``task``), the task
recipes it combines (``recipes``, from ``bundles/recipes/``) and its own values, by the config
file they go to (``common`` for all, ``train``, ``inference``, ``evaluate``,
``multi_gpu_train``). The configs users run (``train.json``, ``inference.json``,
``evaluate.json``, ``multi_gpu_train.json``) are written complete, so they read, run and
override like any MONAI bundle from any working directory; what several bundles share is
written once, in the recipes. The dataset's transforms, output names and prediction steps
come from its preset (`medadapt.data.DatasetPreset`).

Layers, later ones winning: ``recipes/base.json``, each task recipe, the preset, ``bundle.json``.
Keys holding ``#`` set one item inside a nested config (MONAI's override syntax); other keys
merge into dicts and replace everything else.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = HERE / "recipes"
# config file -> the recipe sections it is made of
FILES = {
    "train.json": ("common", "train"),
    "inference.json": ("common", "inference"),
    "evaluate.json": ("evaluate",),
    "multi_gpu_train.json": ("multi_gpu_train",),
}
# Files that MONAI merges over train.json at run time (``--config_file "['train.json', ...]"``):
# their ``#`` keys must stay as written, since MONAI applies them to the merged config.
OVERRIDE_FILES = ("evaluate.json", "multi_gpu_train.json")
OVERLAY_KEYS = {"dataset_name", "task", "recipes", *{s for sections in FILES.values() for s in sections}}


def merge(config: dict, layer: dict) -> dict:
    """Apply ``layer`` to ``config`` in place (see the module docstring) and return it."""
    for key, value in layer.items():
        value = copy.deepcopy(value)
        if "#" in key:
            *parents, last = key.split("#")
            target = config
            for part in parents:
                target = target[int(part)] if isinstance(target, list) else target.setdefault(part, {})
            target[int(last) if isinstance(target, list) else last] = value
        elif isinstance(value, dict) and isinstance(config.get(key), dict) and "_target_" not in value:
            merge(config[key], value)
        else:
            config[key] = value
    return config


def preset_layer(name: str, dataset: str, task: str) -> dict:
    """What the dataset's preset contributes, by section."""
    sys.path.insert(0, str(HERE.parent))
    from medadapt.data import get_preset

    preset = get_preset(dataset)
    task = preset.check_task(task)
    outputs = preset.output_names(task)
    common = {"bundle_name": name, "dataset_name": dataset, "task": task, "num_classes": len(outputs),
              "class_names": outputs}
    if task != "classification":
        common["multilabel"] = preset.multilabel(task)
    return {
        "common": common,
        "train": {"train#preprocessing": preset.transform_config("train", task),
                  "validate#preprocessing": preset.transform_config("validate", task)},
        "inference": {"preprocessing": preset.transform_config("infer", task)},
        "prediction_steps": preset.prediction_steps(task),
    }


def build(folder: Path) -> dict[str, dict]:
    """The configs of the bundle in ``folder``, by file name."""
    overlay = json.loads((folder / "bundle.json").read_text(encoding="utf-8"))
    unknown = sorted(set(overlay) - OVERLAY_KEYS)
    if unknown:
        raise ValueError(f"{folder / 'bundle.json'}: unknown keys {unknown}; allowed {sorted(OVERLAY_KEYS)}")
    layers = [json.loads((RECIPES / "base.json").read_text(encoding="utf-8"))]
    layers += [json.loads((RECIPES / f"{recipe}.json").read_text(encoding="utf-8"))
               for recipe in overlay.get("recipes", [])]
    from_preset = preset_layer(folder.name, overlay["dataset_name"], overlay.get("task", ""))
    layers += [from_preset, overlay]
    configs = {}
    for file, sections in FILES.items():
        config: dict = {}
        for layer in layers:
            for section in sections:
                if file in OVERRIDE_FILES:
                    config.update(copy.deepcopy(layer.get(section, {})))
                else:
                    merge(config, layer.get(section, {}))
        if "label_map" in config:
            config["label_map"]["transforms"] += copy.deepcopy(from_preset["prediction_steps"])
        configs[file] = config
    return configs


def bundle_folders() -> list[Path]:
    return sorted(p for p in HERE.iterdir() if (p / "bundle.json").is_file())


def text(config: dict) -> str:
    return json.dumps(config, indent=4) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the written configs are current")
    args = parser.parse_args(argv)
    stale = []
    for folder in bundle_folders():
        for file, config in build(folder).items():
            path = folder / file
            if path.is_file() and path.read_text(encoding="utf-8") == text(config):
                continue
            if args.check:
                stale.append(str(path))
            else:
                path.write_text(text(config), encoding="utf-8")
                print(f"wrote {path}")
    if stale:
        print("stale bundle configs (run python bundles/build.py):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
