"""Idempotence for the demo generators: a marker file records what was generated.

Calling a generator again with the same parameters returns at once; with other parameters
the files listed by the old marker are removed first, so no stale case survives.
"""

from __future__ import annotations

import json
from pathlib import Path

MARKER = ".medadapt_demo.json"
# Bump when a generator's output changes, so old demo folders are rebuilt.
VERSION = 1


def is_current(root: Path, generator: str, params: dict) -> bool:
    """True if ``root`` holds a complete demo made by ``generator`` with ``params``."""
    marker = root / MARKER
    if not marker.is_file():
        return False
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if record.get("generator") != generator or record.get("version") != VERSION or record.get("params") != params:
        return False
    return all((root / name).is_file() for name in record.get("files", []))


def clear_previous(root: Path) -> None:
    """Remove the files an earlier demo run wrote into ``root`` (and folders left empty)."""
    marker = root / MARKER
    if not marker.is_file():
        return
    try:
        files = json.loads(marker.read_text(encoding="utf-8")).get("files", [])
    except (OSError, json.JSONDecodeError):
        files = []
    for name in files:
        path = root / name
        path.unlink(missing_ok=True)
        for parent in path.parents:
            if parent == root or not parent.is_relative_to(root):
                break
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
    marker.unlink()


def write_marker(root: Path, generator: str, params: dict, files: list[Path]) -> None:
    """Record a finished run; written last, so an interrupted run is redone next time."""
    record = {
        "generator": generator,
        "version": VERSION,
        "params": params,
        "files": sorted(str(Path(f).relative_to(root)) for f in files),
    }
    (root / MARKER).write_text(json.dumps(record, indent=1), encoding="utf-8")
