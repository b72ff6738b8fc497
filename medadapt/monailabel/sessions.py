"""Sessions: a client's own image kept by the server for a while, to run models on.

3D Slicer's MONAI Label module uploads a volume the user opened locally by creating a session
(``PUT /session/`` with the file, in the format the user has: NRRD by default) and then runs
models on it with ``POST /infer/<model>?session_id=ID``. MONAI Label's own sessions keep
their files in ``~/.cache``, build their folders from the id a request names (``DELETE
/session/..`` removed the parent) and unpack client archives. Here a session:

- has an id the server makes (32 hexadecimal digits); a request's id is checked against that
  form (400) and against the sessions the server has (404) before any path is built from it;
- lives in ``<app>/sessions/<id>/`` (`confined` to the app folder), holding one image checked
  as an upload is (type, header size, readable voxels; NRRD stored as NIfTI);
- is bounded: at most `MAX_SESSIONS` at once and `MAX_SESSION_BYTES` of images together
  (503 with Retry-After beyond: the time until the oldest expires), and expires
  `SESSION_EXPIRY` seconds after its last use (a client may ask for less); expired sessions are
  removed when sessions are listed, made, or cleaned up by MONAI Label's timer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from medadapt.io import atomic_write_text
from medadapt.monailabel.errors import InvalidInput
from medadapt.monailabel.formats import stored_image
from medadapt.monailabel.imagefiles import (
    ImageFileError,
    discard_upload,
    file_suffix,
    inspect_image_file,
)
from medadapt.monailabel.paths import confined

logger = logging.getLogger("medadapt.monailabel")

SESSION_ID = re.compile(r"[0-9a-f]{32}")
MAX_SESSIONS = 32
MAX_SESSION_BYTES = 4 * 1024 ** 3
SESSION_EXPIRY = 3600  # seconds after the last use (MONAI Label's default)
RECORD = "session.json"
IMAGE = "image"  # the stored image's name, its suffix kept


@dataclass
class Session:
    """One session: its id, its image file (server path) and times (seconds since the epoch)."""

    session_id: str
    image: str
    name: str
    bytes: int
    create_ts: int
    last_access_ts: int
    expiry: int

    def expires_at(self) -> float:
        return self.last_access_ts + self.expiry

    def to_json(self) -> dict[str, Any]:
        """What a client is told: no server paths."""
        return {"session_id": self.session_id, "name": self.name, "create_ts": self.create_ts,
                "last_access_ts": self.last_access_ts, "expiry": self.expiry}


class SessionStore:
    """The sessions of one server, in ``folder`` (inside the app folder).

    Arguments:
      folder: ``<app>/sessions``, created if missing; sessions found there from an earlier run
        are kept while they are valid and not expired, anything else there is removed.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        for entry in self.folder.iterdir():
            session = self._read(entry)
            if session is None:
                _remove(entry)
            else:
                self._sessions[session.session_id] = session
        self.remove_expired()

    # ------------------------------------------------------------------ the store
    def create(self, upload: str, name: str, expiry: float | None = None) -> Session:
        """A new session holding the uploaded file ``upload`` (moved into the session's folder).
        InvalidInput for a file the server cannot run models on, 503 when the store is full."""
        expiry = _expiry(expiry)
        converted = upload
        try:
            converted = stored_image(upload, "the session's image")
            inspect_image_file(converted, read_data=True, name="the session's image")
            size = os.path.getsize(converted)
            with self._lock:
                self._remove_expired_locked()
                self._check_room(size)
                session = self._store(converted, name, size, expiry)
        except ImageFileError as error:
            raise InvalidInput(f"session refused: {error}", error.status) from None
        finally:
            for path in {upload, converted}:  # moved into the session when it was made
                discard_upload(path)
        logger.info("session %s: %s (%d bytes), expires %d s after its last use", session.session_id, session.name,
                    size, expiry)
        return session

    def _store(self, image_file: str, name: str, size: int, expiry: int) -> Session:
        session_id = uuid.uuid4().hex
        folder = Path(confined(self.folder, session_id, what="session folder"))
        folder.mkdir()
        image = folder / (IMAGE + file_suffix(image_file))
        shutil.move(image_file, image)
        now = int(time.time())
        session = Session(session_id, str(image), _display_name(name), size, now, now, expiry)
        atomic_write_text(folder / RECORD, json.dumps(asdict(session)))
        self._sessions[session_id] = session
        return session

    def get(self, session_id: object, touch: bool = True) -> Session:
        """The live session ``session_id`` (its last use set to now with ``touch``); InvalidInput
        400 for an id of another form, 404 for one the server does not have (or no longer)."""
        checked = check_session_id(session_id)
        with self._lock:
            self._remove_expired_locked()
            session = self._sessions.get(checked)
            if session is None:
                raise InvalidInput(f"no session {checked!r} on this server (sessions expire {SESSION_EXPIRY} s after "
                                   "their last use; create one with PUT /session/)", 404)
            if touch:
                session.last_access_ts = int(time.time())
        return session

    def remove(self, session_id: object) -> Session:
        """Delete the session ``session_id`` and its files; InvalidInput as `get`."""
        session = self.get(session_id, touch=False)
        with self._lock:
            self._sessions.pop(session.session_id, None)
            _remove(self.folder / session.session_id)
        return session

    def owns(self, path: object) -> bool:
        """Whether ``path`` is the image of a live session (a file this store wrote)."""
        if not isinstance(path, (str, Path)) or not str(path) or "\0" in str(path):
            return False
        path = Path(path)
        with self._lock:
            session = self._sessions.get(path.parent.name)
        return session is not None and str(path) == session.image and path.is_file() and not path.is_symlink()

    def remove_expired(self) -> int:
        """Remove the expired sessions; their count (called by MONAI Label's clean-up timer too)."""
        with self._lock:
            return self._remove_expired_locked()

    # MONAI Label's names, for its infer endpoint (``sessions().get_session(id).image``).
    def get_session(self, session_id: str, update_ts: bool = True) -> Session:
        return self.get(session_id, touch=update_ts)

    # ------------------------------------------------------------------ inside
    def _remove_expired_locked(self) -> int:
        now = time.time()
        expired = [s for s in self._sessions.values() if s.expires_at() < now]
        for session in expired:
            del self._sessions[session.session_id]
            _remove(self.folder / session.session_id)
            logger.info("session %s expired", session.session_id)
        return len(expired)

    def _check_room(self, size: int) -> None:
        used = sum(s.bytes for s in self._sessions.values())
        full = len(self._sessions) >= MAX_SESSIONS or used + size > MAX_SESSION_BYTES
        if not full:
            return
        oldest = min((s.expires_at() for s in self._sessions.values()), default=time.time() + 60)
        wait = max(1, math.ceil(oldest - time.time()))
        raise HTTPException(503, f"this server holds {len(self._sessions)} sessions ({used:,} bytes), its limit is "
                                 f"{MAX_SESSIONS} sessions and {MAX_SESSION_BYTES:,} bytes: try again later or remove "
                                 "sessions you no longer need (DELETE /session/ID)", headers={"Retry-After": str(wait)})

    def _read(self, entry: Path) -> Session | None:
        """The session recorded in the folder ``entry``, or None for anything else."""
        if not entry.is_dir() or entry.is_symlink() or not SESSION_ID.fullmatch(entry.name):
            return None
        try:
            session = Session(**json.loads((entry / RECORD).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None
        image = Path(session.image)
        if session.session_id != entry.name or image.parent != entry or not image.is_file() or image.is_symlink():
            return None
        return session


def check_session_id(value: object) -> str:
    """``value`` if it has the form of a session id this server makes, else InvalidInput (400)."""
    if not isinstance(value, str) or not SESSION_ID.fullmatch(value):
        shown = value if not isinstance(value, str) or len(value) <= 60 else value[:57] + "..."
        raise InvalidInput(f"session_id {shown!r} is not a session id of this server (32 hexadecimal digits, as "
                           "PUT /session/ answers)", 400)
    return value


def _expiry(expiry: float | None) -> int:
    if expiry in (None, 0):
        return SESSION_EXPIRY
    if isinstance(expiry, bool) or not isinstance(expiry, (int, float)) or not 0 < expiry <= SESSION_EXPIRY:
        raise InvalidInput(f"expiry must be a number of seconds in (0, {SESSION_EXPIRY}], got {expiry!r}", 400)
    return int(math.ceil(expiry))


def _display_name(name: str) -> str:
    name = os.path.basename(str(name or ""))
    return "".join(c for c in name if c.isprintable())[:128] or "image"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass
