"""Run a bundle's configs from Python, exactly as ``python -m monai.bundle run`` runs them.

The protocol runner, the notebooks and MONAI Label's tasks call these, so every entry point
runs the bundle's recipe and nothing else.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# What MONAI's config parser reads in a string: "$" starts Python, "@" a reference, "%" a macro,
# and it rewrites "::", "@#" and "%#" wherever they stand.
_PARSED_TEXT = re.compile(r"^[$@%]|::|[@%]#")


def parses_as_itself(text: str) -> bool:
    """Whether MONAI's config parser takes the string ``text`` as the plain text it is."""
    return not _PARSED_TEXT.search(text)


class Verbatim(Mapping):
    """A read-only mapping that MONAI's config parser passes through untouched.

    The parser reads every string inside the dicts and lists of a config (see `parses_as_itself`),
    but does not look inside other objects. Data from outside a bundle (file names, case ids a
    server was sent) is handed to a config as ``Verbatim(data)``: a file named ``$HOME.png`` stays
    a file name, and ``@data['train']`` in the config gets the list as it was.
    """

    def __init__(self, data: Mapping):
        self._data = dict(data)

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Verbatim({self._data!r})"


def _files(config_file: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    files = [config_file] if isinstance(config_file, (str, os.PathLike)) else list(config_file)
    return [str(f) for f in files]


def root_of(config_file: str | os.PathLike) -> str:
    """The bundle folder of a config file: its folder, or the parent of ``configs/``."""
    folder = Path(config_file).resolve().parent
    return str(folder.parent if folder.name == "configs" else folder)


def workflow(config_file, workflow_type: str = "train", **overrides: Any):
    """A MONAI ``ConfigWorkflow`` of the bundle's config file(s) (merged in order) with
    ``overrides``, its metadata and logging config taken from the first file's folder and its
    ``bundle_root`` that folder's bundle (unless ``overrides`` say otherwise)."""
    from monai.bundle import ConfigWorkflow

    files = _files(config_file)
    folder = Path(files[0]).parent
    logging_file = folder / "logging.conf"
    overrides.setdefault("bundle_root", root_of(files[0]))
    return ConfigWorkflow(config_file=files if len(files) > 1 else files[0], meta_file=str(folder / "metadata.json"),
                          logging_file=str(logging_file) if logging_file.is_file() else False,
                          workflow_type=workflow_type, **overrides)


def run_workflow(config_file, workflow_type: str = "train", **overrides: Any):
    """Initialise, run and finalise the bundle's config file(s) with ``overrides``; returns
    the finished workflow (its ``parser`` holds every component it built)."""
    flow = workflow(config_file, workflow_type, **overrides)
    flow.initialize()
    flow.run()
    flow.finalize()
    return flow


def parsed(config_file, key: str | Sequence[str], **overrides: Any):
    """One component of a bundle config (for example ``network_def``), built with ``overrides``
    but without initialising or running the workflow; for a list of keys, a list of components
    built by one parser, so that they share what they reference (an ``Invertd`` the very
    preprocessing it inverts)."""
    from monai.bundle import ConfigParser

    files = _files(config_file)
    parser = ConfigParser()
    parser.read_config(files)
    parser.update({"bundle_root": root_of(files[0]), **overrides})
    if isinstance(key, str):
        return parser.get_parsed_content(key)
    return [parser.get_parsed_content(k) for k in key]


# ---------------------------------------------------------------------------- the model-zoo layout
CONFIG_FILES = ("metadata.json", "train.json", "inference.json", "evaluate.json", "multi_gpu_train.json",
                "logging.conf")
LARGE_FILE_BYTES = 25 * 2 ** 20  # the model zoo's limit for a committed file
SCHEMA = Path(__file__).resolve().parents[1] / "resources" / "meta_schema_20240725.json"


def bundle_folder(bundle: str | os.PathLike) -> Path:
    """A bundle folder: one of medadapt's by name, or a folder (the flat layout, or the zoo
    layout with ``configs/``)."""
    folder = Path(bundle)
    if folder.is_dir():
        return folder
    from medadapt import bundles

    return bundles.path(str(bundle))


def is_bundle(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a bundle (its configs at its top, or in ``configs/``)."""
    configs = config_dir(folder)
    return (configs / "inference.json").is_file() and (configs / "metadata.json").is_file()


def config_dir(folder: str | os.PathLike) -> Path:
    """Where a bundle's configs are: ``configs/`` in the zoo layout, else the folder itself."""
    folder = Path(folder)
    return folder / "configs" if (folder / "configs" / "metadata.json").is_file() else folder


def export_bundle(bundle: str | os.PathLike, dest: str | os.PathLike, model: str | os.PathLike | None = None,
                  untrained: bool = False, url: str = "", formats: Sequence[str] = ()) -> Path:
    """Write ``bundle`` (a name or a folder) into ``dest`` in the MONAI model-zoo layout.

    ``configs/`` gets the bundle's configs as they are (their ``bundle_root`` is the folder they
    are run from, or the one passed with ``--bundle_root``), ``models/model.pt`` the trained model
    (``model``, else the bundle's own ``models/model.pt`` with its adapter folder; ``untrained``
    writes the network as built, its adapters and head untrained, for checking the layout), then
    ``docs/`` and ``LICENSE``; ``formats`` ("onnx", "pt2", "ts") add ``models/model.<format>``,
    the network exported from the copy (:func:`export_network`). A model file over 25 MB is
    listed in ``large_files.yml`` with its SHA-256 and a URL (``url`` for ``model.pt``; fill them
    in where the files are published), as the model zoo requires.
    """
    import hashlib
    import shutil

    source, dest = bundle_folder(bundle), Path(dest)
    configs = config_dir(source)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and is not empty; export into a new folder")
    missing = [name for name in CONFIG_FILES if not (configs / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{source} is not a complete bundle: it lacks {missing}")
    unknown = sorted(set(formats) - set(EXPORT_FORMATS))
    if unknown:
        raise ValueError(f"formats {unknown}: medadapt exports {sorted(EXPORT_FORMATS)}")
    trained = Path(model) if model else source / "models" / "model.pt"
    if not trained.is_file() and not untrained:
        raise FileNotFoundError(f"no trained model at {trained}: train the bundle first (python -m monai.bundle run "
                                f"--config_file {configs / 'train.json'}), give a model file (--model FILE), or "
                                "export it untrained (--untrained)")
    (dest / "configs").mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        shutil.copyfile(configs / name, dest / "configs" / name)
    (dest / "models").mkdir()
    if trained.is_file():
        shutil.copyfile(trained, dest / "models" / "model.pt")
        if not model and (source / "models" / "adapters").is_dir():
            shutil.copytree(source / "models" / "adapters", dest / "models" / "adapters")
    else:
        import torch

        network = parsed(dest / "configs" / "inference.json", "network_def", bundle_root=str(dest))
        torch.save(network.state_dict(), dest / "models" / "model.pt")
    if (source / "docs").is_dir():
        shutil.copytree(source / "docs", dest / "docs")
    shutil.copyfile(source / "LICENSE", dest / "LICENSE")
    for name in formats:
        export_network(dest, dest / "models" / f"model.{name}")
    large = [p for p in sorted((dest / "models").glob("model.*")) if p.stat().st_size > LARGE_FILE_BYTES]
    if large:
        rows = "".join(f'  - path: "models/{p.name}"\n    url: "{url if p.name == "model.pt" else ""}"\n'
                       f'    hash_val: "{hashlib.sha256(p.read_bytes()).hexdigest()}"\n    hash_type: "sha256"\n'
                       for p in large)
        (dest / "large_files.yml").write_text(
            "# Files over 25 MB are not committed to the model zoo: publish them and put their URLs here.\n"
            f"large_files:\n{rows}", encoding="utf-8")
    return dest


# What export_network writes, by suffix.
EXPORT_FORMATS = {"onnx": "ONNX (onnxruntime), any batch size", "pt2": "torch.export program, any batch size",
                  "ts": "TorchScript (as MONAI's ckpt_export), any batch size"}


def export_network(bundle: str | os.PathLike, path: str | os.PathLike, model_file: str | os.PathLike | None = None,
                   **settings: Any) -> Path:
    """Write a bundle's trained network to ``path`` in the format its suffix names: ``.onnx``,
    ``.pt2`` (``torch.export``) or ``.ts`` (TorchScript).

    The network is inference.json's ``network_def`` built with ``settings`` (those the model was
    trained with: backbone, image_size, ...), with ``model_file`` (default: the bundle's
    ``models/model.pt``) loaded strictly. Every format takes any batch size at the bundle's
    image size (3D: its ROI), and carries the bundle's ``metadata.json`` (its input and output
    shapes set to the exported ones) and ``inference.json``: ONNX in its ``metadata_props``,
    with the input and output named as the metadata names them ("image", "pred"); ``.pt2`` and
    ``.ts`` as extra files.
    """
    import json

    import torch

    from medadapt.models import export as exports

    folder, path = Path(bundle_folder(bundle)), Path(path)
    configs = config_dir(folder)
    kind = path.suffix.lower().lstrip(".")
    if kind not in EXPORT_FORMATS:
        raise ValueError(f"{path}: the suffix names the format: .onnx, .pt2 or .ts")
    weights = Path(model_file) if model_file else folder / "models" / "model.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"no trained model at {weights}: train the bundle first, or pass model_file")
    network = parsed(configs / "inference.json", "network_def", **settings).eval()
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    metadata = exported_metadata(json.loads((configs / "metadata.json").read_text(encoding="utf-8")),
                                 tuple(exports.example_input(network).shape[1:]))
    extra = {"metadata.json": json.dumps(metadata), "inference.json": (configs / "inference.json").read_text(encoding="utf-8")}
    formats = metadata["network_data_format"]
    if kind == "onnx":
        return exports.export_onnx(network, path, input_name=next(iter(formats["inputs"])),
                                   output_name=next(iter(formats["outputs"])), metadata=extra)
    if kind == "pt2":
        return exports.save_program(network, path, extra_files=extra)
    from medadapt.io import atomic_path

    with atomic_path(path) as tmp:
        torch.jit.save(torch.jit.script(network), str(tmp), _extra_files=extra)
    return path


def exported_metadata(metadata: dict, input_shape: Sequence[int]) -> dict:
    """``metadata`` with its network's input shape that of an exported graph whose input is
    (batch, *input_shape): the channels and the spatial size it was exported at (and so the
    spatial size of dense outputs; a class vector has none)."""
    import copy

    metadata = copy.deepcopy(metadata)
    formats = metadata["network_data_format"]
    for tensor in formats.get("inputs", {}).values():
        tensor["num_channels"], tensor["spatial_shape"] = int(input_shape[0]), list(input_shape[1:])
    for tensor in formats.get("outputs", {}).values():
        if tensor.get("spatial_shape"):
            tensor["spatial_shape"] = list(input_shape[1:])
    return metadata


def verify_bundle(folder: str | os.PathLike, device: str = "cpu") -> list[str]:
    """What the MONAI model zoo's CI runs on a submitted bundle, with ``bundle_root`` the
    folder and no other override: ``verify_metadata`` (against the schema the metadata names,
    a copy shipped with medadapt), ``verify_net_in_out``, ``ckpt_export``, and the train and
    inference property checks. Returns the checks passed; raises at the first failure."""
    import json
    import tempfile

    from monai.bundle import (
        ConfigWorkflow,
        ckpt_export,
        verify_metadata,
        verify_net_in_out,
    )

    folder = Path(folder).resolve()
    configs = folder / "configs"
    meta = configs / "metadata.json"
    named = json.loads(meta.read_text(encoding="utf-8")).get("schema", "")
    if not named.endswith(SCHEMA.name):
        raise ValueError(f"{meta} names the schema {named}; medadapt checks against {SCHEMA.name} only")
    passed = []
    with tempfile.TemporaryDirectory() as scratch:
        schema = Path(scratch) / SCHEMA.name
        schema.write_bytes(SCHEMA.read_bytes())  # verify_metadata reads the schema from here, not the web
        verify_metadata(meta_file=str(meta), filepath=str(schema))
        passed.append("verify_metadata")
        verify_net_in_out(net_id="network_def", meta_file=str(meta), config_file=str(configs / "inference.json"),
                          device=device, bundle_root=str(folder))
        passed.append("verify_net_in_out")
        ckpt_export(net_id="network_def", filepath=str(Path(scratch) / "model.ts"),
                    ckpt_file=str(folder / "models" / "model.pt"), meta_file=str(meta),
                    config_file=str(configs / "inference.json"), bundle_root=str(folder))
        passed.append("ckpt_export")
    for name, kind in (("train.json", "train"), ("inference.json", "infer")):
        # The properties are parsed config items: parse, but run none of the config's initialize steps.
        flow = ConfigWorkflow(config_file=str(configs / name), meta_file=str(meta), workflow_type=kind,
                              logging_file=str(configs / "logging.conf"), init_id="no_initialize",
                              bundle_root=str(folder))
        flow.initialize()
        missing = flow.check_properties()
        if missing:
            raise ValueError(f"{configs / name} lacks the required {kind} properties {missing}")
        passed.append(f"{kind} properties")
    return passed
