"""A DICOMweb server that misbehaves: ``medadapt label`` bounds every request to it and keeps serving.

The PACS here is a real HTTP server on a loopback port (``http.server``), answering QIDO-RS and
WADO-RS for a few series, each misbehaving its own way: an answer that trickles a byte at a
time, one that never ends, one that announces far more bytes than its instance listing, HTML
where DICOM belongs, a multipart answer whose boundary is not the announced one, a series of
10,000 instances; and, on demand, a series listing that is not a list of objects. One good
series (real DICOM files written with SimpleITK) shows the server still serves what it can.
The label server runs with ``--dicomweb-timeout 3``.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from monailabel_server import _require_monailabel, label_server
from test_dicomweb import tiny_brats, write_dicom_series
from test_monailabel_security import _peak_rss_mb, _server_pid

pytestmark = pytest.mark.xdist_group("dicomweb_faults")

DICOMWEB_TIMEOUT = 3  # s, the label server's --dicomweb-timeout
STUDY = "1.2.826.0.1.3680043.10.4321.1"
SERIES = {name: f"{STUDY}.{n}" for n, name in enumerate(
    ["good", "trickle", "endless", "lying", "html", "bogus_boundary", "ten_thousand"], start=1)}
BOUNDARY = "medadapt-test-boundary"


# ---------------------------------------------------------------------------- the PACS
def _element(vr: str, value) -> dict:
    return {"vr": vr, "Value": [value]}


def _series_item(name: str) -> dict:
    return {"0020000D": _element("UI", STUDY), "0020000E": _element("UI", SERIES[name]),
            "00080060": _element("CS", "MR"), "0008103E": _element("LO", name)}


def _instance_items(count: int) -> list[dict]:
    """What QIDO says of a series' instances: ``count`` slices of 8 x 8 16-bit pixels."""
    return [{"00280010": _element("US", 8), "00280011": _element("US", 8), "00280100": _element("US", 16)}
            for _ in range(count)]


def _multipart(parts: list[bytes], boundary: str = BOUNDARY) -> bytes:
    body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), part)
                    for part in parts)
    return body + b"--%s--\r\n" % boundary.encode()


class FaultyPACS(BaseHTTPRequestHandler):
    """QIDO-RS and WADO-RS under /dicom-web for the series of `SERIES`, each as its name says."""

    protocol_version = "HTTP/1.0"  # answers without a length end when the connection closes
    state: dict = {}  # "listing": "good" | "not a list"; "good": the good series' DICOM files

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        path, query = url.path.removeprefix("/dicom-web"), parse_qs(url.query)
        parts = path.strip("/").split("/")
        if parts == ["series"]:
            return self._series_search(query)
        if len(parts) == 5 and parts[4] == "instances":
            name = self._name(parts[3])
            count = 0 if int(query.get("offset", ["0"])[0]) > 0 else {"good": 4, "ten_thousand": 10_000}.get(name, 1)
            return self._json(_instance_items(count))
        if len(parts) == 4 and parts[:1] == ["studies"]:
            return self._retrieve(self._name(parts[3]))
        self._json({"error": "not here"}, 404)

    def _name(self, uid: str) -> str:
        return next((name for name, value in SERIES.items() if value == uid), "")

    def _series_search(self, query: dict) -> None:
        if int(query.get("offset", ["0"])[0]) > 0 or query.get("Modality") == ["SEG"]:
            return self._json([])
        if self.state.get("listing") == "not a list":
            return self._json([1, "two", 3])
        self._json([_series_item(name) for name in SERIES])

    def _json(self, value, status: int = 200) -> None:
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _retrieve(self, name: str) -> None:
        content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
        if name == "html":
            body = b"<html><body><h1>Please log in</h1></body></html>"
            return self._send(200, "text/html", body)
        if name == "good":
            return self._send(200, content_type, _multipart(self.state["good"]))
        if name == "bogus_boundary":
            return self._send(200, content_type, _multipart(self.state["good"], boundary="another-boundary"))
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if name == "lying":  # its listing says one 8 x 8 slice: 128 bytes of pixels
            self.send_header("Content-Length", str(200 * 2 ** 20))
        self.end_headers()
        self._stream(name)

    def _stream(self, name: str) -> None:
        """Send until the client hangs up (or a minute passes): a byte every 0.2 s, or as fast as it goes."""
        started = time.monotonic()
        chunk = b"\0" * (1 if name == "trickle" else 2 ** 16)
        try:
            while time.monotonic() - started < 60:
                self.wfile.write(chunk)
                self.wfile.flush()
                if name == "trickle":
                    time.sleep(0.2)
        except OSError:  # the client hung up: what the label server must do
            pass

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """The faulty PACS on a free loopback port; yields its DICOMweb root URL."""
    folder = tmp_path_factory.mktemp("faulty_pacs")
    volume = np.arange(8 * 8 * 4, dtype=np.int16).reshape(8, 8, 4)
    files = write_dicom_series(volume, np.diag([2.0, 2.0, 3.0, 1.0]), folder / "good", STUDY, SERIES["good"],
                               "good", 1)
    FaultyPACS.state = {"listing": "good", "good": [path.read_bytes() for path in files]}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FaultyPACS)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def server(pacs, tmp_path_factory):
    _require_monailabel()
    root = tmp_path_factory.mktemp("faulty_pacs_server")
    tiny = {**tiny_brats(root), "network_def#in_channels": 1, "input_mapping": "repeat"}  # one T1 series
    (root / "models.json").write_text(json.dumps({"models": {"brats_t1": {"bundle": "dka_brats",
                                                                          "overrides": tiny}}}))
    with label_server(root, pacs, root / "models.json", ["--dicomweb-timeout", str(DICOMWEB_TIMEOUT)]) as running:
        yield running


def _cached(server, name: str) -> list[Path]:
    """Whatever the label server keeps of a series in its DICOMweb cache."""
    return [p for p in (server.app_dir / "dicomweb").rglob(f"*{SERIES[name]}*")]


def _detail(response) -> str:
    assert response.headers.get("content-type", "").startswith("application/json"), response.text[:300]
    return response.json()["detail"]


# ---------------------------------------------------------------------------- tests
def test_a_good_series_is_served(server, tmp_path):
    import nibabel as nib

    answer = server.get("/datastore/image", params={"image": SERIES["good"]})
    assert answer.status_code == 200, answer.text[:300]
    (tmp_path / "good.nii.gz").write_bytes(answer.content)
    assert nib.load(str(tmp_path / "good.nii.gz")).shape == (8, 8, 4)


@pytest.mark.parametrize("name, status, says", [
    ("trickle", 504, f"did not arrive within {DICOMWEB_TIMEOUT} s"),
    ("endless", 502, "more than the"),
    ("lying", 502, "announces 209,715,200 bytes"),
    ("html", 502, "not DICOM instances"),
    ("bogus_boundary", 502, "not DICOM instances"),
    ("ten_thousand", 413, "10,000 instances exceed"),
])
def test_every_pacs_answer_is_bounded_and_checked(server, pacs, name, status, says):
    """Each misbehaving series is answered within the DICOMweb timeout, naming the server, with
    memory bounded and nothing of it left in the cache; the server serves on."""
    pid = _server_pid(server)
    peak_before = _peak_rss_mb(pid)
    started = time.monotonic()
    answer = server.get("/datastore/image", params={"image": SERIES[name]})
    took = time.monotonic() - started
    assert answer.status_code == status, (name, answer.status_code, answer.text[:300])
    detail = _detail(answer)
    assert says in detail and SERIES[name] in detail, detail
    if status == 502 or status == 504:
        assert pacs.removesuffix("/dicom-web") in detail, detail  # the server at fault is named
    assert took < DICOMWEB_TIMEOUT + 15, took
    assert _peak_rss_mb(pid) - peak_before < 100  # the endless answers were 200 MB and more
    assert not _cached(server, name)
    assert server.get("/info/").status_code == 200


def test_a_series_download_counts_against_the_inference_time(server):
    """A client's 1 s inference timeout holds while the series is still trickling in."""
    started = time.monotonic()
    answer = server.post("/infer/brats_t1", params={"image": SERIES["trickle"]},
                         files={"params": (None, json.dumps({"timeout": 1}))})
    assert answer.status_code == 504, answer.text[:300]
    assert "within the 1 s this inference may take" in _detail(answer)
    assert time.monotonic() - started < 1 + 10


def test_the_proxy_is_bounded_and_leaves_the_server_answering(server):
    """A viewer reading a trickling series through /proxy/dicom gets a 504 within the
    DICOMweb timeout; meanwhile the server answers everyone else (upstream read the answer,
    without any timeout, on the server's event loop)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        started = time.monotonic()
        proxied = pool.submit(server.get, f"/proxy/dicom/studies/{STUDY}/series/{SERIES['trickle']}")
        time.sleep(0.5)
        info_started = time.monotonic()
        assert server.get("/info/").status_code == 200
        assert time.monotonic() - info_started < 5
        answer = proxied.result()
    assert answer.status_code == 504 and f"within {DICOMWEB_TIMEOUT} s" in answer.text, answer.text[:300]
    assert time.monotonic() - started < DICOMWEB_TIMEOUT + 15
    answer = server.get("/proxy/dicom/series")
    assert answer.status_code == 200 and len(answer.json()) == len(SERIES)


def test_a_series_listing_that_is_not_a_list_of_objects_leaves_the_server_serving(server, pacs):
    good = server.get("/datastore/image", params={"image": SERIES["good"]})
    assert good.status_code == 200
    FaultyPACS.state["listing"] = "not a list"
    try:
        # An id the last listing lacks makes the server list again: the PACS answers [1, "two", 3].
        answer = server.post("/infer/brats_t1", params={"image": f"{STUDY}.99"})
        assert answer.status_code == 502, answer.text[:300]
        assert "not a list of DICOM JSON objects" in _detail(answer) and pacs in _detail(answer)
        # Everything else is served from the last good listing.
        assert server.get("/info/").status_code == 200
        listed = server.get("/datastore/", params={"output": "all"})
        assert listed.status_code == 200 and SERIES["good"] in listed.json()["objects"], listed.text[:300]
        assert server.get("/datastore/", params={"output": "stats"}).status_code == 200
        again = server.get("/datastore/image", params={"image": SERIES["good"]})
        assert again.status_code == 200 and again.content == good.content
    finally:
        FaultyPACS.state["listing"] = "good"
