"""The MONAI Label server's guards, against a real server (started once for this file).

Each reported problem has its regression test: label tags that leave the studies folder,
params that point inference at any server file, an id naming a /tmp/tmp* file taken for an
upload (and deleted), inputs whose headers claim more voxels or pixels than the server
decodes, and volumes with NaN voxels. Then the properties: every request is bounded in bytes
and time, a mix of good and bad requests at once is all answered, and fuzzed parameters never
get a 5xx or make a file appear outside the studies folder and the app's own folders.

The server here takes request bodies up to 8 MiB, sent within 5 s, so the bounds can be tested
with small requests.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import os
import struct
import tempfile
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from monailabel_server import Server, _leftover_uploads, running_server

MAX_REQUEST_MB = 8
UPLOAD_TIMEOUT = 5
pytestmark = pytest.mark.xdist_group("monailabel_security")  # one server for the file


# Study names that MONAI's config parser would read as Python, a reference and a macro.
CONFIG_SYNTAX_NAMES = ("$HOME", "@seed", "%seed::x")


# Volumes whose header cannot place or scale their voxels: name -> (how, what the answer says).
BAD_HEADERS = {
    "nan_affine": ("affine", "NaN or infinite"),
    "inf_affine": ("affine", "NaN or infinite"),
    "zero_affine": ("affine", "all zero"),
    "rank1_affine": ("affine", "singular (rank 1"),
    "huge_slope": ("scaling", "scl_slope"),
}


def _add_bad_studies(studies: Path, facts: dict) -> None:
    """A 4-channel volume with a few NaN voxels, slices named in config syntax, volumes with
    bad headers (`BAD_HEADERS`), a volume of huge voxels, and operator links leading inside and
    outside the studies folder, beside the good studies."""
    import nibabel as nib

    volume = facts["volume"].copy()
    volume[20:22, 20:22, 20:22, 1] = np.nan
    nib.save(nib.Nifti1Image(volume, facts["volume_affine"]), studies / "nan_volume.nii.gz")
    for name in CONFIG_SYNTAX_NAMES:
        (studies / f"{name}.png").write_bytes((studies / "mni_slice.png").read_bytes())
    small = np.ascontiguousarray(facts["volume"][::4, ::4, ::4]).astype(np.float32)
    affines = {"nan_affine": np.full((4, 4), np.nan), "inf_affine": np.diag([np.inf, 1.0, 1.0, 1.0]),
               "zero_affine": np.zeros((4, 4)), "rank1_affine": np.ones((4, 4))}
    for name, affine in affines.items():
        header = nib.Nifti1Header()
        header.set_sform(affine, code=1)
        nib.save(nib.Nifti1Image(small, None, header), studies / f"{name}.nii.gz")
    scaled = nib.Nifti1Image(1000 * small, facts["volume_affine"])
    scaled.header.set_slope_inter(1e38, 0.0)  # 1000 * 1e38 is beyond float32: infinite voxels
    nib.save(scaled, studies / "huge_slope.nii.gz")
    # 8 x 8 x 8 voxels of 200 mm: at brats_tiny's 5 mm, 320^3 x 4 channels = 131 M voxels.
    nib.save(nib.Nifti1Image(small[:8, :8, :8], np.diag([200.0, 200.0, 200.0, 1.0])), studies / "huge_voxels.nii.gz")
    _add_operator_links(studies)


def _add_operator_links(studies: Path) -> None:
    """Links an operator might put into the studies folder: to a study outside it (a file and a
    whole folder, named like images), to an image inside it, and a label folder outside it."""
    outside = studies.parent / "outside_tree"
    (outside / "labels").mkdir(parents=True)
    (outside / "scan.png").write_bytes((studies / "mni_slice.png").read_bytes())
    (outside / "keep.txt").write_text("not the server's to delete", encoding="utf-8")
    (studies / "outside_link.png").symlink_to(outside / "scan.png")
    (studies / "folder_link.nii.gz").symlink_to(outside, target_is_directory=True)
    (studies / "inside_link.png").symlink_to("mni_slice.png")
    (studies / "labels").mkdir()
    (studies / "labels" / "linked").symlink_to(outside / "labels", target_is_directory=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel_security")
    args = ["--max-request-mb", str(MAX_REQUEST_MB), "--upload-timeout", str(UPLOAD_TIMEOUT)]
    with running_server(root, label_args=args, add_studies=_add_bad_studies) as running:
        yield running


# ---------------------------------------------------------------------------- helpers
def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header claims ``width`` x ``height`` grey pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


def _zeros_nifti_gz(shape: tuple[int, ...]) -> bytes:
    """A complete float32 .nii.gz of zeros, streamed: 512^3 is 512 MiB of voxels in ~2.5 MB."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=1) as out:
        out.write(header.binaryblock + b"\0" * 4)
        zeros = bytes(16 * 2 ** 20)
        remaining = int(np.prod(shape)) * 4
        while remaining:
            step = min(remaining, len(zeros))
            out.write(zeros[:step])
            remaining -= step
    return buffer.getvalue()


def _label_png(server: Server) -> bytes:
    return _png_bytes((server.facts["slice"] > 40).astype(np.uint8))


def _detail(response) -> str:
    assert response.headers.get("content-type", "").startswith("application/json"), response.text[:300]
    return response.json()["detail"]


def _server_pid(server: Server) -> int:
    """The MONAI Label process (the child of the ``medadapt label`` launcher)."""
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text(encoding="utf-8").split()
    return int(children[0])


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def _raw_request(server: Server, method: str, path: str, headers: dict[str, str],
                 body_parts=()) -> tuple[int, str]:
    """Send a request by hand (lying Content-Length, chunks, a stalled body); (status, detail)."""
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.putrequest(method, path)
        for key, value in headers.items():
            connection.putheader(key, value)
        connection.endheaders()
        for part in body_parts:
            connection.send(part)
        response = connection.getresponse()
        return response.status, json.loads(response.read())["detail"]
    finally:
        connection.close()


def _files_in(folder: Path, settle: float = 10.0) -> list[Path]:
    """The files left in ``folder`` once MONAI Label's clean-up after the last response (a
    background task that may still be running when the client has the answer) has had time."""
    deadline = time.monotonic() + settle
    while True:
        files = [p for p in folder.iterdir() if p.is_file()]
        if not files or time.monotonic() > deadline:
            return files
        time.sleep(0.2)


def _files_outside(root: Path, server: Server) -> set[Path]:
    """Every file and folder under ``root`` except the studies folder and the runs folder
    (which holds the app folder and the trained adapters)."""
    allowed = (server.studies, server.runs)
    return {p for p in root.rglob("*") if not any(p == a or a in p.parents for a in allowed)}


# ---------------------------------------------------------------------------- 1. label tags
@pytest.mark.parametrize("tag", ["ABSOLUTE", "../../escape_rel", "..", ".", "a/b", "x\\y", ".hidden", "x" * 300])
def test_label_tags_that_are_paths_are_refused_and_write_nothing(server, tag):
    root = server.studies.parent
    if tag == "ABSOLUTE":
        tag = str(root / "escape_abs")
    before = _files_outside(root, server)
    response = server.put("/datastore/label", params={"image": "mni_slice", "tag": tag},
                          files={"label": ("mni_slice.png", _label_png(server))})
    assert response.status_code == 400, response.text
    assert "label tag" in _detail(response) and "plain name" in _detail(response)
    assert _files_outside(root, server) == before
    assert not (root / "escape_abs").exists() and not (root / "escape_rel").exists()
    assert not (server.studies / "labels" / "a").exists()
    assert not _files_in(server.app_dir / "uploads")


def test_a_plain_label_tag_is_stored_inside_the_studies_folder(server):
    response = server.put("/datastore/label", params={"image": "mni_slice", "tag": "reviewed"},
                          files={"label": ("mni_slice.png", _label_png(server))})
    assert response.status_code == 200, response.text
    assert (server.studies / "labels" / "reviewed" / "mni_slice.png").is_file()


# ---------------------------------------------------------------------------- 2. paths in params
def test_params_cannot_point_inference_at_server_files(server):
    outside = server.studies.parent / "outside"
    outside.mkdir(exist_ok=True)
    secret = outside / "secret.png"
    secret.write_bytes(_png_bytes(server.facts["slice"]))
    missing = outside / "missing.png"
    details = {}
    for name, image in (("existing", str(secret)), ("missing", str(missing))):
        params = {"params": (None, json.dumps({"image": image, "session": True}))}
        response = server.post("/infer/seg_tiny", params={"image": "mni_slice", "output": "json"}, files=params)
        assert response.status_code == 404, f"{name}: {response.status_code} {response.text}"
        assert "unknown image" in _detail(response) and image in _detail(response)
        details[name] = _detail(response).replace(image, "PATH")
    # The same answer whether the path exists or not: nothing to learn about the server's files.
    assert details["existing"] == details["missing"]
    # Relative paths (the server runs in the test root) and the studies' own file names too.
    for image in ("models.json", "outside/secret.png", "studies/mni_slice.png", "mni_slice.png"):
        response = server.post("/infer/seg_tiny", params={"image": "mni_slice"},
                               files={"params": (None, json.dumps({"image": image}))})
        assert response.status_code == 404 and "unknown image" in _detail(response), (image, response.text)


# ---------------------------------------------------------------------------- 3. /tmp/tmp* ids
def test_an_id_naming_a_fresh_temp_file_is_not_an_upload_and_is_never_deleted(server):
    handle, path = tempfile.mkstemp(prefix="tmp", suffix=".png", dir=tempfile.gettempdir())
    os.close(handle)
    Path(path).write_bytes(b"not an image, but someone's file")
    try:
        as_id = server.post("/infer/seg_tiny", params={"image": path})
        in_params = server.post("/infer/seg_tiny", params={"image": "mni_slice"},
                                files={"params": (None, json.dumps({"image": path}))})
        for response in (as_id, in_params):
            assert response.status_code == 404 and "unknown image" in _detail(response), response.text
        assert Path(path).read_bytes() == b"not an image, but someone's file"
    finally:
        os.remove(path)


# ---------------------------------------------------------------------------- 4. decoded sizes
def test_a_volume_claiming_512_mib_of_voxels_is_refused_from_its_header(server):
    blob = _zeros_nifti_gz((512, 512, 512))
    assert len(blob) < MAX_REQUEST_MB * 2 ** 20  # small on the wire: only the header tells
    pid = _server_pid(server)
    peak_before = _peak_rss_mb(pid)
    upload = server.put("/datastore/image", params={"image": "huge_volume"},
                        files={"file": ("huge_volume.nii.gz", blob)})
    infer = server.post("/infer/brats_tiny", params={"output": "json"}, files={"file": ("huge.nii.gz", blob)})
    for response in (upload, infer):
        assert response.status_code == 413, response.text
        assert "(512, 512, 512)" in _detail(response) and "voxels" in _detail(response)
    assert "huge_volume" in _detail(upload) and "uploaded file" in _detail(infer)
    assert _peak_rss_mb(pid) - peak_before < 200  # nothing decoded (decoding took over 1 GB)
    assert not (server.studies / "huge_volume.nii.gz").exists()
    assert not _files_in(server.app_dir / "uploads")


def test_a_png_claiming_30000_by_30000_pixels_is_refused_from_its_header(server):
    blob = _png_claiming(30000, 30000)
    upload = server.put("/datastore/image", params={"image": "huge_png"}, files={"file": ("huge.png", blob)})
    infer = server.post("/infer/seg_tiny", params={"output": "json"}, files={"file": ("huge.png", blob)})
    for response in (upload, infer):
        assert response.status_code == 413, response.text
        assert "30000x30000" in _detail(response) and "limit" in _detail(response)
    assert "huge_png" in _detail(upload) and "uploaded file" in _detail(infer)
    assert "huge_png" not in server.get("/datastore/", params={"output": "all"}).json()["objects"]


def test_request_bodies_are_bounded_in_bytes_and_in_time(server):
    limit = MAX_REQUEST_MB * 2 ** 20
    boundary = "x" * 16
    form = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    # Announced too large: refused before a byte of the body is read.
    status, detail = _raw_request(server, "PUT", "/datastore/image?image=big",
                                  {**form, "Content-Length": str(limit + 1)})
    assert status == 413 and f"{limit:,}" in detail, detail
    # Sent in chunks with no length: refused once the limit is passed.
    opening = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n').encode()
    part = b"a" * 2 ** 20
    chunks = [b"%x\r\n%s\r\n" % (len(data), data) for data in [opening] + [part] * (MAX_REQUEST_MB + 1)]
    status, detail = _raw_request(server, "PUT", "/datastore/image?image=big",
                                  {**form, "Transfer-Encoding": "chunked"}, chunks)
    assert status == 413 and "exceeds this server's limit" in detail, detail
    # A body that stops coming: answered once the upload time is spent.
    started = time.monotonic()
    status, detail = _raw_request(server, "PUT", "/datastore/image?image=slow",
                                  {**form, "Content-Length": "1000"}, [b"--" + boundary.encode()])
    assert status == 408 and f"within {UPLOAD_TIMEOUT} s" in detail, detail
    assert UPLOAD_TIMEOUT - 0.5 <= time.monotonic() - started < UPLOAD_TIMEOUT + 30
    assert server.get("/info/").status_code == 200


def test_inference_is_bounded_in_time(server):
    # A client may shorten the server's inference timeout, never lengthen it.
    for timeout in (10 ** 6, 0, -1, "soon", True):
        response = server.post("/infer/seg_tiny", params={"image": "mni_slice"},
                               files={"params": (None, json.dumps({"timeout": timeout}))})
        assert response.status_code == 400 and "timeout must be" in _detail(response), (timeout, response.text)
    response = server.post("/infer/brats_tiny", params={"image": "mni_volume"},
                           files={"params": (None, json.dumps({"timeout": 0.001}))})
    assert response.status_code == 504 and "did not finish within 0.001 s" in _detail(response), response.text
    # The server keeps serving (the late inference finishes in the background first), and the
    # late inference's label file is deleted.
    response = server.post("/infer/seg_tiny", params={"image": "mni_slice", "output": "json"})
    assert response.status_code == 200, response.text
    assert not _files_in(server.app_dir / "tmp")


# ---------------------------------------------------------------------------- 5. NaN voxels
def test_volumes_with_nan_voxels_are_refused_naming_the_file(server):
    response = server.post("/infer/brats_tiny", params={"image": "nan_volume", "output": "image"})
    assert response.status_code == 422, response.text
    assert "nan_volume" in _detail(response) and "8 NaN or infinite voxels" in _detail(response)
    blob = (server.studies / "nan_volume.nii.gz").read_bytes()
    response = server.post("/infer/brats_tiny", params={"output": "image"}, files={"file": ("scan.nii.gz", blob)})
    assert response.status_code == 422 and "uploaded file" in _detail(response) and "NaN" in _detail(response)
    response = server.put("/datastore/image", params={"image": "nan_copy"}, files={"file": ("nan.nii.gz", blob)})
    assert response.status_code == 422 and "NaN" in _detail(response), response.text


@pytest.mark.parametrize("name", sorted(BAD_HEADERS))
def test_volumes_whose_header_cannot_place_or_scale_their_voxels_get_a_4xx_naming_the_file(server, name):
    """NaN, infinite, all-zero and rank-1 affines, and a scl_slope that makes voxels infinite:
    refused at inference (stored or uploaded) and on upload, instead of a 500 from the model."""
    how, problem = BAD_HEADERS[name]
    blob = (server.studies / f"{name}.nii.gz").read_bytes()
    stored = server.post("/infer/brats_tiny", params={"image": name, "output": "image"})
    uploaded = server.post("/infer/brats_tiny", params={"output": "image"}, files={"file": ("scan.nii.gz", blob)})
    added = server.put("/datastore/image", params={"image": f"{name}_copy"}, files={"file": ("v.nii.gz", blob)})
    for response, named in ((stored, f"{name}.nii.gz"), (uploaded, "uploaded file"), (added, f"{name}_copy")):
        assert response.status_code == 422, (name, response.status_code, response.text[:300])
        assert named in _detail(response) and problem in _detail(response) and how in _detail(response), \
            response.text
    assert not (server.studies / f"{name}_copy.nii.gz").exists()


def test_limits_hold_after_the_models_resampling(server):
    """8^3 voxels of 200 mm pass the header's voxel limit, but brats_tiny resamples to 5 mm:
    320^3 x 4 channels = 131 M voxels, twice the limit. Refused before any resampling."""
    pid = _server_pid(server)
    peak_before = _peak_rss_mb(pid)
    response = server.post("/infer/brats_tiny", params={"image": "huge_voxels", "output": "image"})
    assert response.status_code == 413, response.text[:300]
    detail = _detail(response)
    assert "huge_voxels.nii.gz" in detail and "[320, 320, 320] x 4" in detail and "[5.0, 5.0, 5.0] mm" in detail
    assert _peak_rss_mb(pid) - peak_before < 200  # 131 M float32 voxels would be 500 MB
    assert server.post("/infer/brats_tiny", params={"image": "mni_volume", "output": "json"}).status_code == 200


# ---------------------------------------------------------------------------- links in the studies folder
def test_links_leading_outside_the_studies_folder_are_not_served_and_never_deleted(server):
    """An operator's link to a study outside (a file, or a whole folder named like an image) is
    not listed, read, written through or deleted; upstream's DELETE removed a link's target,
    for a folder link the whole tree. A link that stays inside is served, and DELETE removes
    the link, not the image it leads to."""
    outside = server.studies.parent / "outside_tree"
    before = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    listed = server.get("/datastore/", params={"output": "all"}).json()["objects"]
    assert "outside_link" not in listed and "folder_link" not in listed and "inside_link" in listed
    for image in ("outside_link", "folder_link"):
        cases = [
            (server.http.delete(server.url + "/datastore/image", params={"id": image}), 404),
            (server.post("/infer/seg_tiny", params={"image": image, "output": "json"}), 404),
            (server.get("/datastore/image", params={"image": image}), 404),
            (server.put("/datastore/label", params={"image": image, "tag": "final"},
                        files={"label": ("l.png", _label_png(server))}), 404),
        ]
        for response, status in cases:
            assert response.status_code == status, (image, response.request.method, response.text[:300])
    # A label folder that leads outside: nothing is written there.
    response = server.put("/datastore/label", params={"image": "mni_slice", "tag": "linked"},
                          files={"label": ("mni_slice.png", _label_png(server))})
    assert response.status_code == 409 and "leads outside" in _detail(response), response.text
    assert {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before
    # A link inside: served, and only the link is deleted.
    assert server.post("/infer/seg_tiny", params={"image": "inside_link", "output": "json"}).status_code == 200
    response = server.http.delete(server.url + "/datastore/image", params={"id": "inside_link"})
    assert response.status_code == 200, response.text
    assert not os.path.lexists(server.studies / "inside_link.png")
    assert (server.studies / "mni_slice.png").read_bytes() == _png_bytes(server.facts["slice"])
    assert "mni_slice" in server.get("/datastore/", params={"output": "all"}).json()["objects"]


# ---------------------------------------------------------------------------- refusals of upstream routes
def test_upstream_routes_that_act_on_client_paths_are_refused(server):
    cases = [
        (server.post("/infer/seg_tiny", params={"session_id": "../../x"}), 400, "not a session id"),
        (server.put("/model/seg_tiny", files={"file": ("w.pt", b"weights")}), 405, "cannot be uploaded"),
        (server.post("/infer/wsi_v2/seg_tiny", params={"image": "/etc/passwd"}), 404, "whole-slide"),
        (server.get("/proxy/dicom/qido/studies"), 404, "no DICOMweb datastore"),
        (server.put("/datastore/image", params={"image": "mni_slice"}, files={"file": ("a.png", _label_png(server))}),
         409, "already in the datastore"),
        (server.put("/datastore/image/info", params={"image": "mni_slice"}, files={"info": (None, "[1, 2")}),
         400, "info must be a JSON object"),
        (server.post("/infer/seg_tiny", params={"image": "mni_slice"}, files={"params": (None, "{\"box\": 1e999}")}),
         400, "params"),
        (server.post("/infer/seg_tiny", params={"image": "mni_slice"},
                     files={"params": (None, json.dumps({"device": "cuda:99x"}))}), 400, "device must be"),
        (server.post("/infer/seg_tiny"), 400, "send an image"),
        (server.post("/train/seg_tiny", params={"run_sync": "true"}, json={"max_epochs": 10 ** 9}), 400, "max_epochs"),
        (server.post("/train/seg_tiny", params={"run_sync": "true"}, json={"method": "nope"}), 400, "unknown method"),
        (server.post("/activelearning/nope"), 404, "unknown strategy"),
        (server.http.head(server.url + "/datastore/image", params={"image": "mni_slice", "check_sum": "FOO:1"}),
         400, None),
    ]
    for response, status, message in cases:
        assert response.status_code == status, f"{message}: {response.status_code} {response.text}"
        assert message is None or message in _detail(response), response.text  # HEAD answers have no body
    # Upstream's batch inference divides by the GPU count; here it runs on the CPU, each image
    # through the same checks (the corrupt one fails alone).
    response = server.post("/batch/infer/seg_tiny", params={"run_sync": "true"},
                           json={"device": "cpu", "max_batch_size": 16, "max_workers": 2, "save_label": False})
    assert response.status_code == 200, response.text
    assert response.json()["corrupt"] == {} and response.json()["mni_slice"]["params"]["label_shape"], response.json()
    # MONAI Label would remove the parent of its sessions folder (requests' clients drop "..").
    for method in ("GET", "DELETE"):
        status, detail = _raw_request(server, method, "/session/..", {})
        assert status == 400 and "'..' segment" in detail, detail
    # The image that a re-upload would have replaced is intact.
    assert (server.studies / "mni_slice.png").read_bytes() == _png_bytes(server.facts["slice"])
    # Each dataset download is a new ZIP archive on the server: deleted once sent.
    response = server.put("/datastore/label", params={"image": "mni_slice", "tag": "final"},
                          files={"label": ("mni_slice.png", _label_png(server))})
    assert response.status_code == 200, response.text
    response = server.get("/datastore/dataset")
    assert response.status_code == 200 and response.content.startswith(b"PK"), response.text[:200]
    assert not _files_in(server.app_dir / "tmp")


# ---------------------------------------------------------------------------- 1b. no client string is code
def _hostile_values(marker: Path) -> list:
    """Strings a MONAI config would run or resolve: each form would create ``marker``, or
    read another part of the config, if it reached the bundle as it was sent."""
    touch = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    return [f"${touch}", f"$({touch}, 1)[1]", "@device", "@network_def#backbone", "%train#trainer", "@#seed",
            "1::2"]


def test_no_training_option_is_ever_read_as_code(server, tmp_path):
    marker = tmp_path / "ran"
    fields = ["max_epochs", "fraction", "seed", "batch_size", "lr_adapter", "lr_head", "method", "init",
              "box_jitter", "device"]
    for run_sync in ("true", "false"):
        for value in _hostile_values(marker):
            for field in fields:
                response = server.post("/train/seg_tiny", params={"run_sync": run_sync}, json={field: value})
                assert 400 <= response.status_code < 500, (field, value, response.text)
                assert field in _detail(response), (field, value, response.text)
            for options in ({"activation": value}, {"targets": value}, {"targets": [value]}, {value: 1},
                            {"bottleneck": value}):
                response = server.post("/train/seg_tiny", params={"run_sync": run_sync},
                                       json={"method_options": options})
                assert response.status_code == 400, (options, response.text)
                assert "method_options" in _detail(response), response.text
            # the deprecated route that trains every model checks each model's request too
            response = server.post("/train/", params={"run_sync": run_sync}, json={"seg_tiny": {"lr_head": value}})
            assert response.status_code == 400 and "lr_head" in _detail(response), response.text
    assert not marker.exists()
    assert server.get("/train/").status_code in (200, 404)  # no job was queued; the server serves on
    assert "seg_tiny" in server.get("/info/").json()["models"]


def test_a_targets_pattern_that_would_never_finish_matching_is_refused(server):
    """``(.*.*.*.*.*)*X`` against a block name never finishes (Python's re cannot be
    interrupted): the training job would hang, holding the server's one training slot."""
    for options in ({"targets": "(.*.*.*.*.*)*X"}, {"targets": "(a|aa)*b"}):
        started = time.monotonic()
        response = server.post("/train/seg_tiny", params={"run_sync": "true"}, json={"method_options": options})
        assert response.status_code == 400, response.text[:300]
        assert "targets" in _detail(response) and "inside a repetition" in _detail(response)
        assert time.monotonic() - started < 30


def test_studies_named_in_config_syntax_train_as_data(server):
    """A study called "$HOME" is a file name: training reads it (a 500 when the name was Python)."""
    for name in CONFIG_SYNTAX_NAMES:
        response = server.put("/datastore/label", params={"image": name, "tag": "final"},
                              files={"label": (f"{name}.png", _label_png(server))})
        assert response.status_code == 200, response.text
    response = server.post("/train/seg_tiny", params={"run_sync": "true"},
                           json={"max_epochs": 1, "batch_size": 1, "init": "fresh"})
    assert response.status_code == 200, response.text
    stats = response.json()
    assert stats["studies_used"] >= len(CONFIG_SYNTAX_NAMES), stats
    assert stats["metrics"]["epoch"] == 1


# ---------------------------------------------------------------------------- many at once
def test_a_mix_of_good_and_bad_requests_at_once_is_all_answered(server):
    slice_png = (server.studies / "mni_slice.png").read_bytes()
    box = {"params": (None, json.dumps({"box": server.facts["brain_box"]}))}
    calls = [
        ("seg", lambda: server.post("/infer/seg_tiny", params={"image": "mni_slice", "output": "image"}), 200),
        ("cls", lambda: server.post("/infer/cls_tiny", params={"image": "mni_slice", "output": "json"}), 200),
        ("box", lambda: server.post("/infer/litemedsam_box", params={"image": "mni_slice", "output": "image"},
                                    files=box), 200),
        ("upload infer", lambda: server.post("/infer/seg_tiny", params={"output": "json"},
                                             files={"file": ("s.png", slice_png)}), 200),
        ("list", lambda: server.get("/datastore/", params={"output": "all"}), 200),
        ("info", lambda: server.get("/info/"), 200),
        ("tag path", lambda: server.put("/datastore/label", params={"image": "mni_slice", "tag": "../x"},
                                        files={"label": ("l.png", _label_png(server))}), 400),
        ("params path", lambda: server.post("/infer/seg_tiny", params={"image": "mni_slice"},
                                            files={"params": (None, json.dumps({"image": "/etc/hostname"}))}), 404),
        ("huge png", lambda: server.post("/infer/seg_tiny", files={"file": ("h.png", _png_claiming(30000, 30000))}),
         413),
        ("nan", lambda: server.post("/infer/brats_tiny", params={"image": "nan_volume"}), 422),
        ("garbage", lambda: server.post("/infer/seg_tiny", files={"file": ("g.png", os.urandom(256))}), 422),
        ("bad json", lambda: server.post("/infer/seg_tiny", params={"image": "mni_slice"},
                                         files={"params": (None, "{nope")}), 400),
        ("unknown model", lambda: server.post("/infer/nope", params={"image": "mni_slice"}), 404),
    ]
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [(name, pool.submit(call), status) for name, call, status in calls]
        answers = [(name, future.result(), status) for name, future, status in futures]
    for name, response, status in answers:
        assert response.status_code == status, f"{name}: {response.status_code} {response.text[:300]}"
    assert server.post("/infer/seg_tiny", params={"image": "mni_slice", "output": "json"}).status_code == 200
    assert not _files_in(server.app_dir / "uploads")


# ---------------------------------------------------------------------------- torn labels
_OVERWRITE_LABEL = """
import resource, sys
from medadapt.monailabel.datastore import CheckedDatastore
from medadapt.monailabel.imagefiles import DATASTORE_PATTERNS

studies, label, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = CheckedDatastore(studies, extensions=DATASTORE_PATTERNS)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # from here on the disk is full past `limit` bytes
try:
    store.save_label("scan", label, "final", {})
except Exception as error:
    print("refused:", getattr(error, "status_code", None), getattr(error, "detail", error))
"""


def test_a_full_disk_while_a_final_label_is_overwritten_leaves_the_old_label(tmp_path):
    """The datastore the server runs, overwriting a final label when the disk fills up (a file
    size limit: Python ignores SIGXFSZ, so writes past it fail with EFBIG, as with ENOSPC).
    Upstream truncated the old label and left a partial file, served afterwards and failing
    training with a 500; here the write goes to a temporary file, renamed only when complete."""
    import subprocess
    import sys

    from PIL import Image

    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 2, (512, 512), dtype=np.uint8)
    Image.fromarray(255 * noise).save(studies / "scan.png")
    old = _png_bytes(np.zeros((512, 512), np.uint8))
    (studies / "labels" / "final" / "scan.png").write_bytes(old)
    new = tmp_path / "new_label.png"
    new.write_bytes(_png_bytes(noise))  # incompressible: ~35 KB, past the limit below
    assert len(new.read_bytes()) > 4 * 8192
    result = subprocess.run([sys.executable, "-c", _OVERWRITE_LABEL, str(studies), str(new), "8192"],
                            capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    final = studies / "labels" / "final"
    assert (final / "scan.png").read_bytes() == old  # never truncated or half written
    assert "refused: 507" in result.stdout and "unchanged" in result.stdout, result.stdout
    assert sorted(p.name for p in final.iterdir()) == ["scan.png"]  # no temporary left behind
    record = json.loads((studies / "datastore_v2.json").read_text(encoding="utf-8"))
    assert "final" in record["objects"]["scan"]["labels"]


# ---------------------------------------------------------------------------- fuzzing
NAMES = st.one_of(st.text(max_size=40), st.sampled_from(
    ["..", ".", "../..", "/etc", "/tmp", "a/../..", "..\\..", "\0", " x", "labels", "final", "mni_slice"]))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
PARAMS = st.one_of(
    st.text(max_size=60),
    st.dictionaries(st.sampled_from(["image", "session", "label", "device", "timeout", "save_label", "label_tag",
                                     "box", "logging", "skip_writer"]) | st.text(max_size=8), JSON, max_size=4)
    .map(json.dumps),
)
BOXES = st.one_of(JSON, st.lists(st.one_of(st.integers(-10 ** 400, 10 ** 400), st.floats(), st.text(max_size=4)),
                                 min_size=0, max_size=5))
REQUESTS = st.one_of(
    st.tuples(st.just("label tag"), NAMES),
    st.tuples(st.just("infer id"), NAMES),
    st.tuples(st.just("upload id"), NAMES),
    st.tuples(st.just("download"), NAMES),
    st.tuples(st.just("params"), PARAMS),
    st.tuples(st.just("box"), BOXES),
)


def _fuzz_request(server: Server, kind: str, value):
    label = {"label": ("l.png", _label_png(server))}
    if kind == "label tag":
        return server.put("/datastore/label", params={"image": "mni_slice", "tag": value}, files=label)
    if kind == "infer id":
        return server.post("/infer/seg_tiny", params={"image": value, "output": "json"})
    if kind == "upload id":
        return server.put("/datastore/image", params={"image": value}, files={"file": ("f.png", _label_png(server))})
    if kind == "download":
        return server.get("/datastore/label", params={"label": "mni_slice", "tag": value})
    if kind == "params":
        return server.post("/infer/seg_tiny", params={"image": "mni_slice", "output": "json"},
                           files={"params": (None, value)})
    return server.post("/infer/litemedsam_box", params={"image": "mni_slice", "output": "json"},
                       files={"params": (None, json.dumps({"box": value}))})


def test_fuzzed_parameters_never_get_a_5xx_or_write_outside(server):
    root = server.studies.parent
    escape = f"medadapt-fuzz-{uuid.uuid4().hex}"
    outside_targets = [Path(tempfile.gettempdir()) / escape, root / escape]
    before = _files_outside(root, server)
    started = time.time() - 1
    answers = []

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(request=REQUESTS)
    @example(request=("label tag", str(outside_targets[0])))
    @example(request=("label tag", f"../../{escape}"))
    @example(request=("upload id", f"../../{escape}"))
    @example(request=("params", json.dumps({"image": str(root / "models.json"), "session": True})))
    @example(request=("params", json.dumps({"label_tag": f"../../{escape}", "save_label": True})))
    @example(request=("box", [10 ** 400, 0, 1, 1]))
    def fuzz(request):
        kind, value = request
        response = _fuzz_request(server, kind, value)
        answers.append(response.status_code)
        assert response.status_code < 500, f"{kind} {value!r}: {response.status_code} {response.text[:300]}"
        if response.status_code >= 400:
            assert _detail(response)  # a message, not a traceback

    fuzz()
    assert len(answers) >= 20 and 200 in answers and any(400 <= a < 500 for a in answers)  # both paths run
    assert server.get("/info/").status_code == 200
    assert not _files_in(server.app_dir / "uploads")
    assert _files_outside(root, server) == before
    assert not any(target.exists() for target in outside_targets)
    assert not _leftover_uploads(started, {_label_png(server)})
