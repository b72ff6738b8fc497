"""Run the notebooks top to bottom and store them with their outputs, so that they read on a
code host without running them.

    python notebooks/regenerate.py                 # every notebook (about 15 minutes on 2 CPU cores)
    python notebooks/regenerate.py 02              # the notebooks whose names start with 02
    python notebooks/regenerate.py --check         # are the stored outputs those of the current sources?

Each notebook runs in a fresh kernel of this interpreter from a temporary folder, writing its
files under a temporary ``MEDADAPT_NOTEBOOK_OUTPUT`` (nothing in the repository changes but the
notebook). The stored notebook is cleaned of what is noise on a code host: ANSI colours, carriage
-return progress lines, this machine's folders (shown as ``<outputs>`` and ``<repository>``).
Its metadata records the SHA-256 of its cells' sources; ``--check`` (and the test suite) fails
when a cell changed after the outputs were made, naming the command that brings them up to date.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent
REPO = NOTEBOOK_DIR.parent
CELL_TIMEOUT = int(os.environ.get("MEDADAPT_NOTEBOOK_CELL_TIMEOUT", "1800"))
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def notebooks(prefixes=()) -> list[Path]:
    found = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if prefixes:
        found = [p for p in found if any(p.name.startswith(prefix) for prefix in prefixes)]
    return found


def source_digest(nb) -> str:
    """SHA-256 over every cell's type and source: what the outputs were made from."""
    digest = hashlib.sha256()
    for cell in nb.cells:
        digest.update(cell.cell_type.encode() + b"\0" + cell.source.encode("utf-8") + b"\0")
    return digest.hexdigest()


def stale(path: Path) -> str | None:
    """Why the stored outputs of ``path`` are not those of its sources, or None when they are."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    record = nb.metadata.get("medadapt", {})
    if record.get("source_sha256") != source_digest(nb):
        return (f"{path.name}: its cells changed after its outputs were made; run "
                f"`python notebooks/regenerate.py {path.name[:2]}`")
    unrun = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and cell.execution_count is None]
    if unrun:
        return f"{path.name}: code cells {unrun} have no outputs; run `python notebooks/regenerate.py {path.name[:2]}`"
    return None


def _clean_text(text: str, replacements: dict[str, str]) -> str:
    text = ANSI.sub("", text)
    # A carriage return redraws a line (progress bars): keep only what the reader finally sees.
    text = "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text


def _merged_streams(outputs: list) -> list:
    """Consecutive writes to one stream as one output, so that a progress bar's redraws, which
    arrive as many small writes, collapse to the line the reader finally sees."""
    merged = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (output.get("output_type") == "stream" and previous is not None
                and previous.get("output_type") == "stream" and previous["name"] == output["name"]):
            previous["text"] += output["text"]
        else:
            merged.append(output)
    return merged


def clean(nb, replacements: dict[str, str]) -> None:
    """Outputs as a code host should show them: no colours, progress redraws or local folders."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for output in _merged_streams(cell.outputs):
            if output.get("output_type") == "stream":
                output["text"] = _clean_text(output["text"], replacements)
                if not output["text"].strip():
                    continue
            elif "data" in output:
                for kind in ("text/plain", "text/html", "text/markdown"):
                    if kind in output["data"]:
                        value = output["data"][kind]
                        value = "".join(value) if isinstance(value, list) else value
                        output["data"][kind] = _clean_text(value, replacements)
                output.get("metadata", {}).pop("application/vnd.jupyter.widget-view+json", None)
            elif output.get("output_type") == "error":
                raise RuntimeError(f"cell failed: {output.get('ename')}: {output.get('evalue')}")
            kept.append(output)
        cell.outputs = kept
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)


def _kernel_manager(kernel_dir: Path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    spec_dir = kernel_dir / "python3"
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (medadapt)", "language": "python"}), encoding="utf-8")
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)


def execute(path: Path, scratch: Path, save: bool = True):
    """Run ``path`` in a fresh kernel from ``scratch``; store it cleaned (``save``) and return it."""
    import nbclient
    import nbformat
    from nbformat.validator import normalize

    nb = nbformat.read(path, as_version=4)
    _, nb = normalize(nb)
    nb = nbformat.from_dict(nb)
    work, outputs = scratch / "work", scratch / "outputs"
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update({"MEDADAPT_REPO": str(REPO), "MEDADAPT_NOTEBOOK_OUTPUT": str(outputs),
                       "MPLBACKEND": "module://matplotlib_inline.backend_inline"})
    client = nbclient.NotebookClient(nb, km=_kernel_manager(scratch / "kernels"), timeout=CELL_TIMEOUT,
                                     allow_errors=False, resources={"metadata": {"path": str(work)}})
    start = time.perf_counter()
    client.execute(cleanup_kc=True)
    seconds = time.perf_counter() - start
    clean(nb, {str(outputs): "<outputs>", str(outputs.resolve()): "<outputs>", str(work): "<work>",
               str(REPO): "<repository>"})
    import torch

    nb.metadata["medadapt"] = {
        "source_sha256": source_digest(nb),
        "regenerated": time.strftime("%Y-%m-%d"),
        "seconds": round(seconds),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
    }
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if save:
        nbformat.write(nb, path)
    return nb, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefixes", nargs="*", help="notebooks whose names start with these (default: all)")
    parser.add_argument("--check", action="store_true", help="only check that the stored outputs are current")
    args = parser.parse_args(argv)
    chosen = notebooks(args.prefixes)
    if not chosen:
        parser.error(f"no notebook in {NOTEBOOK_DIR} starts with {args.prefixes}")
    if args.check:
        problems = [p for p in map(stale, chosen) if p]
        print("\n".join(problems) or f"{len(chosen)} notebooks: outputs current")
        return 1 if problems else 0
    for path in chosen:
        with tempfile.TemporaryDirectory(prefix=f"notebook-{path.stem}-") as scratch:
            print(f"running {path.name} ...", flush=True)
            _, seconds = execute(path, Path(scratch))
            print(f"  stored with its outputs ({seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
