"""DICOMweb in, DICOM SEG out: ``medadapt label --studies http://.../dicom-web`` against a real Orthanc.

Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``) runs on a loopback port with its
configuration and storage in a temporary folder. It holds real anatomy written as DICOM series
with SimpleITK: the MNI152 T1 template (nilearn) at 4 mm, and a second study of four
"sequences" (t1, t1ce, t2, flair: intensity variants of the same template, standing in for
BraTS' four series, with FLAIR on the 2 mm grid so that the server must resample it). The
served models are tiny ConvNeXt-atto configurations of the dka_brats bundle: one with a single
input channel (a T1 series) and the 4-channel one.

Without Orthanc (not root, no apt) the tests that need it skip, saying how to install it;
`.ci/run` installs it. The same grid check for separate sequence files (the BraTS transform
chain's reader) is tested here too, without a server.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from monailabel_server import (
    TINY_CONVNEXT,
    _require_monailabel,
    _tiny_backbone_checkpoint,
    label_server,
)

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INSTALL = "apt-get update && apt-get install -y orthanc orthanc-dicomweb"
pytestmark = pytest.mark.xdist_group("dicomweb")

ROOT_UID = "1.2.826.0.1.3680043.10.1234"  # test UIDs under one root
T1_STUDY, T1_SERIES = f"{ROOT_UID}.1", f"{ROOT_UID}.1.1"
BRATS_STUDY = f"{ROOT_UID}.2"
SEQUENCES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}  # sequence -> Series Description
SEQUENCE_SERIES = {name: f"{BRATS_STUDY}.{n}" for n, name in enumerate(SEQUENCES, start=1)}


# ---------------------------------------------------------------------------- DICOM series
def write_dicom_series(volume: np.ndarray, affine: np.ndarray, folder: Path, study: str, series: str,
                       description: str, number: int) -> list[Path]:
    """One MR DICOM file per slice k of ``volume`` (X, Y, Z) on the RAS grid ``affine``, with
    the study, series and SOP instance UIDs, position and orientation set here (SimpleITK
    writes what it is given)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(volume).transpose(2, 1, 0)).astype(np.int16))
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]  # DICOM (and ITK) patient axes are LPS
    spacing = np.linalg.norm(lps, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps / spacing).flatten().tolist())
    image.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]).tolist())
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        position = "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        tags = {"0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0008|0018": f"{series}.{k + 1}", "0008|0060": "MR",
                "0008|0020": "20240101", "0008|0030": "120000", "0008|103e": description,
                "0010|0010": "MNI152^Template", "0010|0020": "MNI152", "0020|000d": study, "0020|000e": series,
                "0020|0011": str(number), "0020|0013": str(k + 1), "0020|0052": f"{study}.0",
                "0020|0032": position, "0020|0037": orientation, "0018|0050": f"{spacing[2]:.6f}",
                "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}"}
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        files.append(folder / f"{k:04d}.dcm")
        writer.SetFileName(str(files[-1]))
        writer.Execute(plane)
    return files


def mni152(resolution_mm: int) -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 T1 template as int16 0..1000 at 2 or 4 mm (every second 2 mm voxel), and its affine."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=2)
    data, affine = t1.get_fdata(), t1.affine.copy()
    if resolution_mm == 4:
        data = data[::2, ::2, ::2]
        affine[:3, :3] *= 2
    return np.rint(1000 * data / data.max()).astype(np.int16), affine


# ---------------------------------------------------------------------------- Orthanc
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A real Orthanc on loopback ports, configuration and storage in a temporary folder,
    holding the test studies; yields {"url", "http", "files"}."""
    import requests

    if ORTHANC is None or not DICOMWEB_PLUGIN.is_file():
        pytest.skip(f"needs Orthanc with its DICOMweb plugin: {INSTALL}")
    root = tmp_path_factory.mktemp("orthanc")
    port = _free_port()
    config = {"Name": "medadapt-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "HttpPort": port, "DicomPort": _free_port(), "DicomServerEnabled": False,
              "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "Plugins": [str(DICOMWEB_PLUGIN)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": "127.0.0.1", "Ssl": False}}
    (root / "orthanc.json").write_text(json.dumps(config))
    with open(root / "orthanc.log", "w") as log:
        process = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    http = requests.Session()
    http.trust_env = False
    try:
        for _ in range(120):
            try:
                if http.get(f"{base}/system", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.25)
        else:
            pytest.fail(f"Orthanc did not answer: {(root / 'orthanc.log').read_text(encoding='utf-8')[-2000:]}")
        files = _upload_studies(root / "series", http, base)
        yield {"url": f"{base}/dicom-web", "base": base, "http": http, "files": files}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def _upload_studies(folder: Path, http, base: str) -> dict[str, list[Path]]:
    t1, affine = mni152(4)
    files = {T1_SERIES: write_dicom_series(t1, affine, folder / "single_t1", T1_STUDY, T1_SERIES, "T1", 1)}
    fine, fine_affine = mni152(2)
    for n, (sequence, description) in enumerate(SEQUENCES.items(), start=1):
        uid = SEQUENCE_SERIES[sequence]
        if sequence == "flair":  # another grid: the server resamples it onto the requested series'
            volume, grid = np.rint(0.7 * fine).astype(np.int16), fine_affine
        else:
            volume, grid = np.rint(t1 * (0.6 + 0.2 * n)).astype(np.int16), affine
        files[uid] = write_dicom_series(volume, grid, folder / sequence, BRATS_STUDY, uid, description, n)
    for series_files in files.values():
        for path in series_files:
            response = http.post(f"{base}/instances", data=path.read_bytes(), timeout=30)
            assert response.status_code == 200, response.text
    return files


# ---------------------------------------------------------------------------- the server
def tiny_brats(root: Path) -> dict:
    """dka_brats overrides for a tiny ConvNeXt-atto (its fixed weights written into ``root``)."""
    checkpoint = _tiny_backbone_checkpoint(root / "convnext_atto_tiny.safetensors", seed=0)
    return {"backbone": "timm:convnext_atto", "backbone_checkpoint": str(checkpoint),
            "backbone_options": TINY_CONVNEXT, "method": "dka", "method_options": {"bottleneck": 4},
            "roi_size": [32, 32, 4], "pixdim": [5.0, 5.0, 5.0], "release": "2021", "sw_batch_size": 4}


@pytest.fixture(scope="module")
def server(orthanc, tmp_path_factory):
    _require_monailabel()
    root = tmp_path_factory.mktemp("dicomweb_server")
    tiny = tiny_brats(root)
    config = {"models": {
        # A T1 series is one channel: dka_brats with one input channel copied to the backbone's three.
        "brats_t1": {"bundle": "dka_brats", "overrides": {**tiny, "network_def#in_channels": 1,
                                                          "input_mapping": "repeat"}},
        "brats": {"bundle": "dka_brats", "overrides": tiny},
    }}
    (root / "models.json").write_text(json.dumps(config))
    with label_server(root, orthanc["url"], root / "models.json") as running:
        yield running


def _nifti(content: bytes, folder: Path, name: str):
    import nibabel as nib

    path = folder / name
    path.write_bytes(content)
    return nib.load(str(path))


def _segs(orthanc) -> list[dict]:
    answer = orthanc["http"].get(f"{orthanc['url']}/series", params={"Modality": "SEG"}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _retrieve_seg(orthanc, seg: dict):
    """The SEG instance, fetched from Orthanc by WADO-RS (a multipart answer of one instance)."""
    import pydicom

    study, series = seg["0020000D"]["Value"][0], seg["0020000E"]["Value"][0]
    instances = orthanc["http"].get(f"{orthanc['url']}/studies/{study}/series/{series}/instances", timeout=30).json()
    instance = instances[0]["00080018"]["Value"][0]
    # Orthanc's REST API gives the file itself (WADO-RS would wrap it in a multipart answer).
    found = orthanc["http"].post(f"{orthanc['base']}/tools/find", json={
        "Level": "Instance", "Query": {"SOPInstanceUID": instance}}, timeout=30).json()
    data = orthanc["http"].get(f"{orthanc['base']}/instances/{found[0]}/file", timeout=30).content
    return pydicom.dcmread(io.BytesIO(data))


# ---------------------------------------------------------------------------- tests
def test_series_are_the_images_and_arrive_with_their_geometry(server, orthanc, tmp_path):
    listed = server.get("/datastore/", params={"output": "all"}).json()["objects"]
    assert set(listed) == {T1_SERIES, *SEQUENCE_SERIES.values()}
    assert listed[T1_SERIES]["image"]["info"]["SeriesDescription"] == "T1"
    # The series as the models receive it: the template's voxels on the template's RAS grid.
    answer = server.get("/datastore/image", params={"image": T1_SERIES})
    assert answer.status_code == 200, answer.text
    image = _nifti(answer.content, tmp_path, "t1.nii.gz")
    t1, affine = mni152(4)
    np.testing.assert_allclose(image.affine, affine, atol=1e-4)
    assert np.array_equal(np.asarray(image.dataobj), t1)


def test_inference_on_a_series_and_its_label_saved_as_dicom_seg(server, orthanc, tmp_path):
    import highdicom as hd

    t1, affine = mni152(4)
    answer = server.post("/infer/brats_t1", params={"image": T1_SERIES, "output": "image"})
    predicted = _nifti(answer.content, tmp_path, "pred.nii.gz") if answer.status_code == 200 else None
    assert predicted is not None, answer.text
    assert predicted.shape == t1.shape  # back on the series' own grid after the bundle's 5 mm RAS resampling
    np.testing.assert_allclose(predicted.affine, affine, atol=1e-4)
    assert set(np.unique(np.asarray(predicted.dataobj)).tolist()) <= {0, 1, 2, 4}

    # An annotator's final label (real anatomy: grey and white matter by intensity) goes back as a SEG.
    label = np.zeros(t1.shape, dtype=np.uint8)
    label[t1 > 300] = 1
    label[t1 > 600] = 2
    import nibabel as nib

    nib.save(nib.Nifti1Image(label, affine), tmp_path / "label.nii.gz")
    before = len(_segs(orthanc))
    info = {"label_info": [{"name": "grey matter", "idx": 1}, {"name": "white matter", "idx": 2}]}
    answer = server.put("/datastore/label", params={"image": T1_SERIES, "tag": "final"},
                        files={"label": ("label.nii.gz", (tmp_path / "label.nii.gz").read_bytes()),
                               "params": (None, json.dumps(info))})
    assert answer.status_code == 200, answer.text
    segs = _segs(orthanc)
    assert len(segs) == before + 1
    seg = hd.seg.Segmentation.from_dataset(_retrieve_seg(orthanc, segs[-1]), copy=False)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == T1_SERIES
    assert seg.StudyInstanceUID == T1_STUDY
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["grey matter", "white matter"]
    # Every source instance has its frame, and it holds the label's slice at that position:
    # SimpleITK wrote DICOM pixel (row r, column c) of slice k from voxel (c, r, k).
    sources = {f"{T1_SERIES}.{k + 1}": k for k in range(t1.shape[2])}
    frames = seg.get_pixels_by_source_instance(list(sources), segment_numbers=[1, 2])
    for (uid, k), frame in zip(sources.items(), frames):
        expected = label[:, :, k].T
        assert np.array_equal(frame[..., 0], expected == 1), uid
        assert np.array_equal(frame[..., 1], expected == 2), uid

    # The labelled series is now "completed", and its final label reads back from the cache.
    assert server.get("/datastore/", params={"output": "stats"}).json()["completed"] >= 1
    answer = server.get("/datastore/label", params={"label": T1_SERIES, "tag": "final"})
    assert answer.status_code == 200, answer.text
    assert np.array_equal(np.asarray(_nifti(answer.content, tmp_path, "back.nii.gz").dataobj), label)


def test_inference_answers_a_dicom_seg_when_asked(server, orthanc):
    import pydicom

    answer = server.post("/infer/brats_t1", params={"image": T1_SERIES, "output": "dicom_seg"})
    assert answer.status_code == 200, answer.text
    seg = pydicom.dcmread(io.BytesIO(answer.content))
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == T1_SERIES
    assert {s.SegmentLabel for s in seg.SegmentSequence} <= {"necrotic tumour core", "peritumoral edema",
                                                            "enhancing tumour"}


def test_four_series_study_becomes_the_brats_models_four_channels(server, tmp_path):
    t1_series = SEQUENCE_SERIES["t1"]
    answer = server.post("/infer/brats", params={"image": t1_series, "output": "image"})
    assert answer.status_code == 200, answer.text
    label = _nifti(answer.content, tmp_path, "brats.nii.gz")
    t1, affine = mni152(4)
    assert label.shape == t1.shape  # on the grid of the series the request named
    np.testing.assert_allclose(label.affine, affine, atol=1e-4)
    log = server.log.read_text(encoding="utf-8")
    assert f"sequences ['t1', 't1ce', 't2', 'flair'] of study {BRATS_STUDY} as channels" in log
    assert "sequence flair" in log and "resampled onto it" in log  # FLAIR's 2 mm grid, said in the log
    # A study without the four sequences: a 422 naming what it holds and the accepted names.
    answer = server.post("/infer/brats", params={"image": T1_SERIES, "output": "image"})
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert "no series for the t1ce sequence" in detail and "'T1'" in detail and "t1gd" in detail


def test_a_seg_made_elsewhere_is_read_back_for_training(server, orthanc, tmp_path):
    """A SEG another tool stored (written here with highdicom directly, frame by frame from the
    source instances) becomes a final label on the series' grid and a training pair."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    uid = SEQUENCE_SERIES["t2"]
    t1, affine = mni152(4)
    label = (t1 > 450).astype(np.uint8)
    sources = [pydicom.dcmread(str(path)) for path in orthanc["files"][uid]]
    frames = np.stack([label[:, :, k].T for k in range(len(sources))])  # SimpleITK's pixel (r, c) of slice k
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type="BINARY",
        segment_descriptions=[hd.seg.SegmentDescription(
            1, "bright tissue", codes.SCT.Tissue, codes.SCT.Tissue, "MANUAL")],
        series_instance_uid=hd.UID(), series_number=77, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="another tool", manufacturer_model_name="test", software_versions="1", device_serial_number="1")
    buffer = io.BytesIO()
    seg.save_as(buffer)
    answer = orthanc["http"].post(f"{orthanc['base']}/instances", data=buffer.getvalue(), timeout=30)
    assert answer.status_code == 200, answer.text

    pairs = server.get("/datastore/", params={"output": "train"}).json()
    assert any(Path(p["image"]).name == f"{uid}.nii.gz" for p in pairs), pairs
    answer = server.get("/datastore/label", params={"label": uid, "tag": "final"})
    assert answer.status_code == 200, answer.text
    back = _nifti(answer.content, tmp_path, "elsewhere.nii.gz")
    np.testing.assert_allclose(back.affine, affine, atol=1e-4)
    assert np.array_equal(np.asarray(back.dataobj), label)


def test_bad_requests_are_refused_and_nothing_reaches_the_pacs(server, orthanc, tmp_path):
    import nibabel as nib

    segs = len(_segs(orthanc))
    wrong = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), dtype=np.uint8), np.eye(4)), wrong)
    cases = [
        ("unknown series", server.post("/infer/brats_t1", params={"image": f"{ROOT_UID}.99"}), 404, "unknown image"),
        ("path as id", server.post("/infer/brats_t1", params={"image": "../../etc/passwd"}), 404, "unknown image"),
        ("image upload", server.put("/datastore/image", files={"file": ("x.nii.gz", wrong.read_bytes())}),
         405, "DICOMweb"),
        ("label of wrong shape", server.put("/datastore/label", params={"image": T1_SERIES, "tag": "final"},
                                            files={"label": ("wrong.nii.gz", wrong.read_bytes())}), 422, "shape"),
        ("label tag path", server.put("/datastore/label", params={"image": T1_SERIES, "tag": "../x"},
                                      files={"label": ("wrong.nii.gz", wrong.read_bytes())}), 400, "plain name"),
        ("write through the proxy", server.post("/proxy/dicom/studies", data=b"x"), 405, "only reads"),
    ]
    for what, answer, status, message in cases:
        assert answer.status_code == status, f"{what}: {answer.status_code} {answer.text}"
        assert message in answer.json()["detail"], f"{what}: {answer.text}"
    assert len(_segs(orthanc)) == segs
    # The proxy still reads for viewers.
    answer = server.get("/proxy/dicom/series")
    assert answer.status_code == 200 and {s["0020000E"]["Value"][0] for s in answer.json()} >= {T1_SERIES}
    # The cache lies in the app folder.
    assert any((server.app_dir / "dicomweb").rglob(f"{T1_SERIES}.nii.gz"))


def test_label_command_takes_a_dicomweb_url(tmp_path, capsys):
    _require_monailabel()
    from medadapt.cli import main

    url = "http://127.0.0.1:8042/dicom-web"
    assert main(["label", "--studies", url, "--runs", str(tmp_path / "runs"), "--dry-run"]) == 0
    assert f"--studies {url} " in capsys.readouterr().out
    for bad, message in (("http://user:secret@127.0.0.1/dicom-web", "no user or password"),
                         ("http:///dicom-web", "needs http(s)://HOST")):
        assert main(["label", "--studies", bad, "--dry-run"]) == 2
        assert message in capsys.readouterr().err
    assert main(["label", "--studies", url, "--dicomweb-filter", "[1]", "--dry-run"]) == 2
    assert "must be a JSON object" in capsys.readouterr().err


def test_separate_sequence_files_are_put_on_the_first_ones_grid(tmp_path, caplog):
    """A BraTS case folder of four files, FLAIR on the 2 mm grid and the others on 4 mm: the
    BraTS chain stacks them on t1's grid, FLAIR resampled (and said in the log); MONAI's own
    reader refuses the list with an error naming neither file."""
    import logging

    import nibabel as nib
    from monai.transforms import LoadImage

    from medadapt.data.errors import DatasetError
    from medadapt.datasets.brats import BRATS

    t1, affine = mni152(4)
    fine, fine_affine = mni152(2)
    case = tmp_path / "BraTS2021_00007"
    case.mkdir()
    volumes = {"t1": (t1, affine), "t1ce": (1.2 * t1, affine), "t2": (0.8 * t1, affine),
               "flair": (0.7 * fine, fine_affine)}
    for name, (volume, grid) in volumes.items():
        nib.save(nib.Nifti1Image(volume.astype(np.float32), grid), case / f"{case.name}_{name}.nii.gz")
    entry = BRATS.plain_datalist(case)[0]
    with pytest.raises(RuntimeError, match="affine matrix of all images should be the same"):
        LoadImage(image_only=True)(entry["image"])

    from fixtures_data import bundle_transforms

    transforms = bundle_transforms("dka_brats", "infer", pixdim=None)
    with caplog.at_level(logging.WARNING, logger="medadapt"):
        image = transforms(entry)["image"]
    assert image.shape == (4, *t1.shape)
    np.testing.assert_allclose(image.affine.numpy(), affine, atol=1e-5)
    # t1's 4 mm voxel centres are every second 2 mm centre: linear resampling hits FLAIR's own voxels.
    raw = LoadImage(image_only=True, ensure_channel_first=True)
    channels = [raw(entry["image"][n])[0] for n in range(3)]
    flair_on_t1 = 0.7 * fine[::2, ::2, ::2].astype(np.float32)
    for n, expected in enumerate([*channels, flair_on_t1]):
        inside = np.asarray(expected) != 0
        zscored = (np.asarray(expected)[inside] - np.asarray(expected)[inside].mean()) / np.asarray(expected)[inside].std()
        np.testing.assert_allclose(np.asarray(image[n])[inside], zscored, atol=1e-3)
    warnings = [r.getMessage() for r in caplog.records if "resampled onto t1's grid" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("flair (") and "spacing [2.0, 2.0, 2.0]" in warnings[0]

    # A file that does not overlap the first one's grid is refused, naming both.
    far = fine_affine.copy()
    far[:3, 3] += 1000.0
    nib.save(nib.Nifti1Image((0.7 * fine).astype(np.float32), far), case / f"{case.name}_flair.nii.gz")
    with pytest.raises(RuntimeError) as refused:  # MONAI's Compose wraps what a transform raises
        transforms(entry)
    assert isinstance(refused.value.__cause__, DatasetError)
    assert re.search(r"flair \(.*_flair.nii.gz\) does not overlap the grid of t1 \(.*_t1.nii.gz\)",
                     str(refused.value.__cause__))


# ---------------------------------------------------------------------------- damaged series
DAMAGED_STUDY = f"{ROOT_UID}.3"
DAMAGED_SERIES = {"uneven": f"{DAMAGED_STUDY}.1", "no_position": f"{DAMAGED_STUDY}.2",
                  "no_birth_date": f"{DAMAGED_STUDY}.3"}


def _damage(files: list[Path], kind: str) -> None:
    """Edit written instances: one slice moved halfway to the next (uneven), one slice without
    Image Position (Patient), or every instance without Patient's Birth Date."""
    import pydicom

    datasets = [pydicom.dcmread(str(path)) for path in files]
    if kind == "uneven":
        here, there = (np.asarray(ds.ImagePositionPatient, dtype=float) for ds in datasets[3:5])
        datasets[3].ImagePositionPatient = [f"{v:.6f}" for v in (here + there) / 2]
    elif kind == "no_position":
        del datasets[2].ImagePositionPatient
    else:
        for ds in datasets:
            del ds.PatientBirthDate
    for ds, path in zip(datasets, files):
        ds.save_as(str(path))


@pytest.fixture(scope="module")
def damaged(orthanc, tmp_path_factory):
    """Series of `DAMAGED_SERIES` stored on Orthanc (8 slices of the MNI template each)."""
    folder = tmp_path_factory.mktemp("damaged")
    t1, affine = mni152(4)
    for n, (kind, uid) in enumerate(DAMAGED_SERIES.items(), start=1):
        files = write_dicom_series(t1[:, :, 16:24], affine, folder / kind, DAMAGED_STUDY, uid, "T1", n)
        _damage(files, kind)
        for path in files:
            response = orthanc["http"].post(f"{orthanc['base']}/instances", data=path.read_bytes(), timeout=30)
            assert response.status_code == 200, response.text
    return DAMAGED_SERIES


@pytest.mark.parametrize("kind, problem", [("uneven", "not evenly spaced"),
                                           ("no_position", "no usable ImagePositionPatient")])
def test_a_series_whose_geometry_cannot_be_trusted_is_refused_at_inference(server, damaged, kind, problem):
    """SimpleITK reads such a series with a guessed spacing, and the model would run on it;
    refused with a 422 naming the series and what is wrong, before any model sees it."""
    uid = damaged[kind]
    answer = server.post("/infer/brats_t1", params={"image": uid, "output": "image"})
    assert answer.status_code == 422, answer.text[:300]
    detail = answer.json()["detail"]
    assert uid in detail and problem in detail and "geometry cannot be trusted" in detail, detail
    assert not list((server.app_dir / "dicomweb").rglob(f"{uid}*"))  # nothing of it stays in the cache
    answer = server.get("/datastore/image", params={"image": uid})
    assert answer.status_code == 422 and problem in answer.json()["detail"]


def test_a_source_series_without_birth_date_gets_its_seg(server, orthanc, damaged, tmp_path):
    """Patient's Birth Date is type 2 (it may be empty, not absent), yet some series lack it;
    highdicom failed on it (a 500). The SEG carries it empty."""
    import nibabel as nib
    import pydicom

    uid = damaged["no_birth_date"]
    answer = server.post("/infer/brats_t1", params={"image": uid, "output": "dicom_seg"})
    assert answer.status_code == 200, answer.text[:300]
    seg = pydicom.dcmread(io.BytesIO(answer.content))
    assert seg.Modality == "SEG" and seg.PatientBirthDate == ""
    image = _nifti(server.get("/datastore/image", params={"image": uid}).content, tmp_path, "image.nii.gz")
    label = (np.asarray(image.dataobj) > 300).astype(np.uint8)
    nib.save(nib.Nifti1Image(label, image.affine), tmp_path / "label.nii.gz")
    before = len(_segs(orthanc))
    answer = server.put("/datastore/label", params={"image": uid, "tag": "final"},
                        files={"label": ("label.nii.gz", (tmp_path / "label.nii.gz").read_bytes())})
    assert answer.status_code == 200, answer.text[:300]
    assert len(_segs(orthanc)) == before + 1
