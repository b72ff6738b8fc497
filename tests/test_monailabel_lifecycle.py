"""The label server's own state, against real servers: what it serves, what it scored, stopping.

A bundle model without trained adapters answers noise (its head or decoder is untrained): the
server started without ``--serve-untrained`` does not serve it (not listed as a model, 409 at
inference, listed under ``not_served`` with the reason) until adapters appear. ``/info/`` shows
each served model's recorded validation. SIGTERM and SIGINT to ``medadapt label`` stop the
server and every process it started (a training job included): before, the MONAI Label child
kept serving under PID 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
from monailabel_server import REPO, label_server, running_server

pytestmark = pytest.mark.xdist_group("monailabel_lifecycle")  # one server for the file


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel_lifecycle")
    with running_server(root, serve_untrained=False, extra_models={"seg_scored": ("dka_busi_seg", {"image_size": 64})}
                        ) as running:
        yield running


def test_untrained_bundle_models_are_not_served_without_the_flag(server):
    info = server.get("/info/").json()
    # Trained adapters (seg_trained, the classifiers) and the pretrained box model are served.
    assert set(info["models"]) == {"seg_trained", "cls_tiny", "cls_wrong_base", "litemedsam_box"}
    assert set(info["not_served"]) == {"brats_tiny", "seg_tiny", "seg_scored"}
    for reason in info["not_served"].values():
        assert "no trained adapters" in reason and "--serve-untrained" in reason
    assert "seg_tiny" in info["trainers"]  # it can still be trained, to be served
    answer = server.post("/infer/seg_tiny", params={"image": "mni_slice", "output": "json"})
    assert answer.status_code == 409 and "--serve-untrained" in answer.json()["detail"], answer.text


def test_a_model_is_served_with_its_recorded_validation_once_it_has_adapters(server):
    """Adapters appearing in the server's own training folder (with the training's record)
    make the model served, and /info/ shows the validation it reached."""
    folder = server.runs / "seg_scored" / "monailabel_adapters"
    shutil.copytree(server.runs / "seg_trained" / "adapters", folder)
    stats = {"metrics": {"val_mean_dice": 0.5, "best_val_mean_dice": 0.625, "best_epoch": 3, "epoch": 4}}
    (folder / "train_stats.json").write_text(json.dumps(stats), encoding="utf-8")
    info = server.get("/info/").json()
    assert "seg_scored" in info["models"] and "seg_scored" not in info["not_served"]
    validation = info["models"]["seg_scored"]["validation"]
    assert validation["metric"] == "val_mean_dice" and validation["best"] == 0.625 and validation["epoch"] == 3
    assert info["models"]["cls_tiny"]["validation"] is None  # trained outside any recorded run
    answer = server.post("/infer/seg_scored", params={"image": "mni_slice", "output": "json"})
    assert answer.status_code == 200 and answer.json()["trained"] is True, answer.text


def test_a_bundles_published_model_shows_its_runs_best_score(tmp_path):
    """A bundle's train.json publishes its best model into <bundle>/models/ with run.json naming
    the run, whose metrics.json holds best_<key metric>."""
    from medadapt.monailabel.specs import BundleModel

    bundle = tmp_path / "dka_busi_seg"
    shutil.copytree(REPO / "bundles" / "dka_busi_seg", bundle, ignore=shutil.ignore_patterns("runs", "models"))
    model = BundleModel.from_bundle(bundle, tmp_path / "runs")
    assert model.validation() is None and model.refusal() and "--serve-untrained" in model.refusal()
    run = tmp_path / "runs_of_bundle" / "dka_litemedsam_f1_fold0_seed0" / "20261201-120000"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"val_mean_dice": 0.7, "best_val_mean_dice": 0.74, "best_epoch": 9}))
    adapters = bundle / "models" / "adapters"
    adapters.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapters / name).write_text("{}")
    (bundle / "models" / "run.json").write_text(json.dumps({"run": str(run)}))
    assert model.refusal() is None
    assert model.validation() == {"metric": "val_mean_dice", "best": 0.74, "epoch": 9,
                                  "record": str(run / "metrics.json")}


# ---------------------------------------------------------------------------- stopping
def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (each thread lists the children it started)."""
    found, pending = set(), [pid]
    while pending:
        parent = pending.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                started = {int(child) for child in children.read_text(encoding="utf-8").split()}
            except OSError:
                continue
            pending.extend(started - found)
            found |= started
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def _stops_everything(server, sig: int, expected_code: int, processes: set[int]) -> None:
    started = time.monotonic()
    os.kill(server.process.pid, sig)
    code = server.process.wait(timeout=60)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in processes if _alive(p)], "processes of the server outlived medadapt label"
    assert not _port_open(server.url)
    assert code == expected_code, server.log_tail()
    assert time.monotonic() - started < 40


def _train_in_background(server) -> int:
    """Start a training job (MONAI Label runs it in a subprocess) and return that process."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((server.facts["slice"] > 40).astype(np.uint8)).save(buffer, format="PNG")
    assert server.put("/datastore/label", params={"image": "mni_slice", "tag": "final"},
                      files={"label": ("mni_slice.png", buffer.getvalue())}).status_code == 200
    before = _descendants(server.process.pid)
    answer = server.post("/train/seg_trained", json={"max_epochs": 50, "batch_size": 1})
    assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = _descendants(server.process.pid) - before
        if new:
            return new.pop()
        time.sleep(0.2)
    raise AssertionError("no training process appeared")


def test_sigterm_stops_the_server_and_its_training_job(server):
    training = _train_in_background(server)
    processes = _descendants(server.process.pid)
    assert training in processes and len(processes) >= 2  # the server and its job
    _stops_everything(server, signal.SIGTERM, 128 + signal.SIGTERM, processes)


def test_sigint_stops_the_server(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"models": {}, "include_box_model": True}))
    with label_server(tmp_path, str(studies), config, serve_untrained=False) as server:
        processes = _descendants(server.process.pid)
        assert processes
        _stops_everything(server, signal.SIGINT, 128 + signal.SIGINT, processes)
