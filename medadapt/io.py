"""Safe, atomic file handling shared by every writer and loader in medadapt."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import Any, Iterator

# A temporary file older than this is abandoned whoever wrote it: no save takes a day, and
# the age rule covers what the pid rule cannot (reused pids, writers on other hosts).
STALE_TEMP_AGE_S = 24 * 3600


def _host() -> str:
    # The host goes into temporary names so that a folder shared between machines (NFS)
    # never has one machine judge another's writer dead by a pid of its own.
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"


# ``.<name>.tmp-<pid>-<token>-<host>``: the hidden folder `atomic_path` writes ``<name>`` through.
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+-(?P<host>\w+)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, but another user's
        return True
    return True


def _remove_if_stale(candidate: Path, name: str | None = None) -> bool:
    """Remove ``candidate`` when it is a temporary of `atomic_path` (for the file ``name``, when
    given) whose writer is dead on this host or which is older than ``STALE_TEMP_AGE_S``."""
    match = _TEMP_NAME.fullmatch(candidate.name)
    if match is None or (name is not None and match["name"] != name):
        return False
    try:
        old = time.time() - candidate.lstat().st_mtime > STALE_TEMP_AGE_S
        dead = match["host"] == _host() and not _pid_alive(int(match["pid"]))
        if not (old or dead):
            return False
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate)
        else:
            candidate.unlink()
        return True
    except OSError:   # gone already, or not ours to remove: never fail a save over it
        return False


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Delete the temporary folders of ``target`` left by writers killed mid-save.

    One is stale when its writer's pid is no longer alive on this host, or when it is older
    than ``STALE_TEMP_AGE_S``; those of live writers are left alone. Returns what was removed.
    """
    target = Path(target)
    try:
        candidates = list(target.parent.glob(f".{glob.escape(target.name)}.tmp-*"))
    except OSError:
        return []
    return [c for c in candidates if _remove_if_stale(c, target.name)]


def remove_stale_temporaries_under(folder: str | os.PathLike) -> list[Path]:
    """Delete every stale temporary (see `remove_stale_temporaries`) in ``folder`` and its
    subfolders: what a run killed mid-save left beside files it may never save again."""
    removed = []
    for parent, dirs, files in os.walk(folder):
        for name in list(dirs) + files:
            if name.startswith(".") and _remove_if_stale(Path(parent) / name):
                removed.append(Path(parent) / name)
                if name in dirs:
                    dirs.remove(name)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for ``path``; rename it over ``path`` only on success.

    A process killed mid-write leaves the previous good file, never a truncated one. The
    temporary file has the target's own name (writers such as nibabel pick the format from
    it) inside a hidden folder beside it, ``.<name>.tmp-<pid>-<token>-<host>/``, which also
    catches the writers' own side files (safetensors writes through a ``.tmpXXXXXX`` of its
    own); a folder left by a killed process is removed by the next save of the same file and
    by a resumed training (`remove_stale_temporaries_under`).
    The file gets the permissions ``open(path, "w")`` would give: the existing file's, or
    the umask's.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    folder = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}-{_host()}"
    folder.mkdir()
    tmp = folder / target.name
    try:
        # os.open with 0o666 applies the umask, as open() does (tempfile.mkstemp forces 0600).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            mode = stat.S_IMODE(target.stat().st_mode)
        except FileNotFoundError:
            mode = stat.S_IMODE(tmp.stat().st_mode)
        yield tmp
        # Set after writing: some writers (safetensors) replace the file with a 0600 one of their own.
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy ``source`` over ``target`` through `atomic_path`: ``target`` is the old file or the
    new one at every moment. A link at ``target`` is replaced by the file, never written through."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def parse_json(text: str, where: str) -> Any:
    """The JSON value in ``text``; ValueError naming ``where`` (a file, an option) for text
    that is not JSON or nests too deeply for the parser (a RecursionError otherwise)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON: {error}") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to read") from None


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in the file ``path``; ValueError naming the file when it is not UTF-8
    JSON (see `parse_json`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from None
    return parse_json(text, str(path))


def read_json_or(path: str | os.PathLike, default: Any) -> Any:
    """The JSON value in the file ``path``, or ``default`` where there is none to read: the file
    is missing, unreadable or not JSON. For records a run rewrites and merges into (metrics.json,
    a training's statistics), where a missing or torn file means "nothing recorded yet"."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return default
