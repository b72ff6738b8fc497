"""Small helpers shared by the dataset presets: finding the dataset folder, ordering files."""

from __future__ import annotations

import os
import re
from pathlib import Path

from medadapt.data.errors import MissingFileError

# Folders that archive tools leave behind and that are never part of a dataset.
IGNORED_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db"}


def natural_key(text: str) -> list:
    """Sort key that orders "benign (2)" before "benign (10)", as a person would."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def visible_entries(folder: Path) -> list[Path]:
    """Children of ``folder`` that are not hidden or archive leftovers, in natural order."""
    return sorted(
        (p for p in folder.iterdir() if not p.name.startswith(".") and p.name not in IGNORED_NAMES),
        key=lambda p: natural_key(p.name),
    )


def require_dir(root: str | os.PathLike, what: str) -> Path:
    """Return ``root`` as a resolved Path, or raise naming it if it is not a folder."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise MissingFileError(f"{what}: dataset folder {str(path)!r} does not exist or is not a folder")
    return path.resolve()


def find_child(root: Path, name: str) -> Path | None:
    """``root/name`` if it exists, else ``root`` itself if it *is* ``name``, else None.

    Lets every preset accept either the official top folder or the folder that holds it.
    """
    if (root / name).exists():
        return root / name
    if root.name == name:
        return root
    return None
