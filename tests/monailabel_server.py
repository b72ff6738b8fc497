"""A real ``medadapt label`` server for the MONAI Label tests, started once per test module.

The studies folder holds real anatomy: the MNI152 T1 template (nilearn, shipped with the
package) down-sampled to 4 mm and stacked into a 4-channel volume standing in for BraTS'
four sequences (with its x axis flipped, so the orientation handling is exercised), an axial
MNI slice as PNG, and a corrupt "PNG". The volume, 2D segmentation and classification models
are tiny ConvNeXt-atto networks built through the real code paths from a fixed backbone
checkpoint written here; the box-prompted model is the real LiteMedSAM (256 px).

`server` is the module-scoped fixture of tests/test_monailabel.py; other modules build their
own with `running_server` (extra ``medadapt label`` options, extra study files) or, for other
studies (a DICOMweb server) and model configs, `label_server`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import medadapt

REPO = Path(__file__).resolve().parents[1]
TINY_CONVNEXT = {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}
STARTUP_TIMEOUT = 180  # s; the server usually answers /info/ within about 20 s
# App folders of the servers started here: where their uploads and temporary files go.
_APP_FOLDERS: list[Path] = []


def _require_monailabel() -> None:
    if importlib.util.find_spec("monailabel") is None:
        pytest.fail("monailabel is not installed: the MONAI Label tests need the [label] extra "
                    "(pip install -e '.[label]')", pytrace=False)


# ---------------------------------------------------------------------------- test data
def _write_studies(folder: Path) -> dict:
    """MNI volume (4 channels), MNI slice PNG, corrupt PNG; returns their facts."""
    import nibabel as nib
    from nilearn import datasets
    from PIL import Image

    folder.mkdir(parents=True)
    t1 = datasets.load_mni152_template(resolution=2)
    data = t1.get_fdata().astype(np.float32)
    small = data[::2, ::2, ::2]  # 4 mm: (50, 59, 48)
    small = small / small.max()
    volume = np.stack([small, small ** 0.8, small ** 1.2, np.sqrt(small)], axis=-1)
    affine = t1.affine.copy()
    affine[:3, :3] *= 2
    affine = np.diag([-1.0, 1.0, 1.0, 1.0]) @ affine  # LAS: Orientationd has real work to undo
    nib.save(nib.Nifti1Image(volume, affine), folder / "mni_volume.nii.gz")

    axial = data[:, :, 50].T[::-1]  # rows = anterior -> posterior, as a viewer shows it
    axial = (255 * axial / axial.max()).astype(np.uint8)
    Image.fromarray(axial).save(folder / "mni_slice.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG but not really an image")
    ys, xs = np.nonzero(axial > 40)
    return {
        "volume_shape": volume.shape[:3],
        "volume_affine": affine,
        "volume": volume,
        "slice_shape": axial.shape,
        "slice": axial,
        "brain_box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
    }


def _tiny_backbone_checkpoint(path: Path, seed: int) -> Path:
    """A fixed ConvNeXt-atto weights file: adapters are only valid on the base they trained on."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=0, **TINY_CONVNEXT)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _classifier_kwargs(checkpoint: Path) -> dict:
    return {"backbone": "timm:convnext_atto", "backbone_checkpoint": str(checkpoint),
            "backbone_options": TINY_CONVNEXT, "num_classes": 3, "method": "dka",
            "method_options": {"bottleneck": 4}}


def _save_trained_classifier(checkpoint: Path, folder: Path) -> None:
    """An adapter folder as training leaves it: adapters and head moved away from their init."""
    model = medadapt.create_model("classification", **_classifier_kwargs(checkpoint))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    medadapt.save_adapters(model, folder)


def _save_trained_segmenter(checkpoint: Path, folder: Path) -> None:
    """Adapters and decoder moved away from their init, with a decoder bias that marks the
    bright anatomy, so the served mask is not empty."""
    model = medadapt.create_model("segmentation", num_classes=1, multilabel=True, in_channels=3,
                                  **{k: v for k, v in _classifier_kwargs(checkpoint).items() if k != "num_classes"})
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    medadapt.save_adapters(model, folder)


def _write_config(root: Path, runs: Path, extra_models: dict | None = None, include_box3d: bool = False) -> Path:
    checkpoint = _tiny_backbone_checkpoint(root / "convnext_atto_tiny.safetensors", seed=0)
    other_base = _tiny_backbone_checkpoint(root / "convnext_atto_other.safetensors", seed=1)
    tiny = {"backbone": "timm:convnext_atto", "backbone_checkpoint": str(checkpoint),
            "backbone_options": TINY_CONVNEXT, "method": "dka", "method_options": {"bottleneck": 4}}
    # Trained adapters for one classifier, and adapters from another base for a second one.
    _save_trained_classifier(checkpoint, runs / "cls_tiny" / "adapters")
    _save_trained_classifier(other_base, runs / "cls_wrong_base" / "adapters")
    _save_trained_segmenter(checkpoint, runs / "seg_trained" / "adapters")
    small = {**tiny, "image_size": 64}
    config = {
        "models": {
            # The repository's bundles, served as inference.json builds them, with small settings.
            "brats_tiny": {"bundle": "dka_brats", "overrides": {
                **tiny, "roi_size": [32, 32, 4], "pixdim": [5.0, 5.0, 5.0], "release": "2021", "sw_batch_size": 4}},
            "seg_tiny": {"bundle": "dka_busi_seg", "overrides": small},
            "seg_trained": {"bundle": "dka_busi_seg", "overrides": small},
            "cls_tiny": {"bundle": "dka_busi_cls", "overrides": small},
            "cls_wrong_base": {"bundle": "dka_busi_cls", "overrides": small},
            **{name: {"bundle": bundle, "overrides": {**tiny, **overrides}}
               for name, (bundle, overrides) in (extra_models or {}).items()},
        },
        "include_box_model": True,
        "include_box3d_model": include_box3d,
    }
    path = root / "models.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- the server
class Server:
    """A running ``medadapt label`` process and an HTTP session to it."""

    def __init__(self, url: str, process: subprocess.Popen, log: Path, facts: dict, studies: Path, runs: Path):
        import requests

        self.url, self.process, self.log, self.facts, self.studies, self.runs = url, process, log, facts, studies, runs
        self.app_dir = runs / "monailabel_app"
        self.http = requests.Session()
        self.http.trust_env = False  # never route 127.0.0.1 through a proxy from the environment

    def get(self, path: str, **kwargs):
        return self.http.get(self.url + path, timeout=300, **kwargs)

    def post(self, path: str, **kwargs):
        return self.http.post(self.url + path, timeout=300, **kwargs)

    def put(self, path: str, **kwargs):
        return self.http.put(self.url + path, timeout=300, **kwargs)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def running_server(root: Path, label_args: Sequence[str] = (),
                   add_studies: Callable[[Path, dict], None] | None = None,
                   extra_models: dict[str, tuple[str, dict]] | None = None,
                   include_box3d: bool = False, serve_untrained: bool = True) -> Iterator[Server]:
    """A ``medadapt label`` server on a free port, serving studies and models written into
    ``root``; stopped (with any training job) on exit.

    Arguments:
      root: an empty folder for the studies, runs, config and log.
      label_args: more ``medadapt label`` options, e.g. ``["--max-request-mb", "8"]``.
      add_studies: called with (studies folder, facts) before the server starts, to add files.
      extra_models: more served models, {name: (bundle, overrides)}, on the tiny ConvNeXt.
      include_box3d: serve the 3D box model too.
      serve_untrained: start it with ``--serve-untrained`` (most of the tiny models are untrained).
    """
    _require_monailabel()
    facts = _write_studies(root / "studies")
    if add_studies:
        add_studies(root / "studies", facts)
    config = _write_config(root, root / "runs", extra_models, include_box3d)
    with label_server(root, str(root / "studies"), config, label_args, serve_untrained) as running:
        running.facts = facts
        yield running


@contextmanager
def label_server(root: Path, studies: str, config: Path, label_args: Sequence[str] = (),
                 serve_untrained: bool = True) -> Iterator[Server]:
    """``medadapt label --studies STUDIES --config CONFIG`` on a free port, its runs and log in
    ``root``, answering /info/ (else the test fails with the log's tail); stopped on exit.
    With ``serve_untrained`` (the tests' tiny models have no trained adapters) it gets
    ``--serve-untrained``."""
    _require_monailabel()
    import requests

    runs = root / "runs"
    port = _free_port()
    log = root / "server.log"
    env = {**os.environ, "MONAI_LABEL_SESSIONS": "false",
           "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)}
    if os.environ.get("PYTEST_XDIST_WORKER"):
        env["OMP_NUM_THREADS"] = "1"  # two workers share two cores, as in conftest.py
    command = [sys.executable, "-m", "medadapt", "label", "--studies", studies, "--host", "127.0.0.1",
               "--port", str(port), "--runs", str(runs), "--config", str(config),
               "--bundle-root", str(REPO / "bundles"), *(["--serve-untrained"] if serve_untrained else []), *label_args]
    with open(log, "w") as out:
        # A session of its own: teardown stops the launcher, the server and any training job together.
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=root, env=env,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    running = Server(url, process, log, {}, Path(studies), runs)
    _APP_FOLDERS.append(running.app_dir)
    try:
        deadline = time.time() + STARTUP_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{running.log_tail()}", pytrace=False)
            try:
                if running.get("/info/").status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                pytest.fail(f"no answer from {url}/info/ within {STARTUP_TIMEOUT} s:\n{running.log_tail()}",
                            pytrace=False)
            time.sleep(0.5)
        yield running
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("monailabel")) as running:
        yield running


def _stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def _leftover_uploads(since: float, payloads: set[bytes]) -> list[Path]:
    """Copies of refused uploads still on disk (MONAI Label's own cleanup runs only after
    successful requests): in the system temp folder, where upstream writes them, and in the
    upload and temporary folders of the servers started here, where this app writes them."""
    folders = [(Path(tempfile.gettempdir()), "tmp*")]
    folders += [(app / sub, "*") for app in _APP_FOLDERS for sub in ("uploads", "tmp")]
    left = []
    for folder, pattern in folders:
        for path in folder.glob(pattern):
            try:
                if path.is_file() and path.stat().st_mtime >= since and path.read_bytes() in payloads:
                    left.append(path)
            except OSError:
                continue  # another process's file vanished meanwhile
    return left
