"""Confinement of every path a request can name: the server's files stay in its own folders.

A request names files only through single names (an image id, a label tag, an upload's
suffix); the server never takes a path from a client. `plain_name` refuses anything that is
not one harmless path component, and `confined` joins names under a root folder and checks
that the result is still inside it, so whatever a request says, a path built from it stays in
the studies folder or the app's own folders.

`confined` checks the normalised path; `resolves_inside` checks it again with every link
followed. The datastores serve a file only where both hold: a link the operator put into the
studies folder is served when it leads to a file inside that folder, and ignored (not listed,
read, written or deleted) when it leads outside, so no request can reach, replace or delete
what lies beyond it. No request can make a link (uploads are copied, never linked).
"""

from __future__ import annotations

import os
from pathlib import Path

from medadapt.monailabel.errors import InvalidInput

MAX_NAME_LENGTH = 128  # characters; file systems refuse names over 255 bytes with a 500 otherwise


def plain_name(value: object, what: str) -> str:
    """``value`` if it can name one file or folder inside another, else InvalidInput (400).

    Arguments:
      value: the name a request sent (an image id, a label tag).
      what: how messages call it, e.g. "label tag".
    """
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{what} must be a non-empty name, got {value!r}", 400)
    problem = None
    if len(value) > MAX_NAME_LENGTH:
        problem = f"longer than {MAX_NAME_LENGTH} characters"
    elif "/" in value or "\\" in value:
        problem = "a path ('/' or '\\')"
    elif value.startswith("."):
        problem = "hidden or relative (a leading '.')"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        problem = "holding control characters"
    elif value != value.strip():
        problem = "starting or ending with white space"
    if problem:
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise InvalidInput(f"{what} {shown!r} is {problem}; it must be a plain name "
                           "(no '/', '\\', control characters or leading '.')", 400)
    return value


def is_inside(path: str | Path, root: str | Path) -> bool:
    """Whether the normalised absolute ``path`` is ``root`` or lies below it."""
    path, root = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(root))
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolves_inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path``, with every link on the way followed, lies inside ``root`` (its own
    links followed too). ``path`` need not exist: its existing part is resolved."""
    return is_inside(os.path.realpath(path), os.path.realpath(root))


def confined(root: str | Path, *parts: str, what: str = "path") -> str:
    """``root/parts...`` as a normalised absolute path, or InvalidInput (400) if it leaves ``root``.

    The parts come from the server's own records (a stored image id, a tag folder); names a
    request sends are passed through `plain_name` first, so this is the last line, not the first.
    """
    path = os.path.normpath(os.path.join(os.path.abspath(root), *parts))
    if not is_inside(path, root):
        raise InvalidInput(f"{what} {os.path.join(*parts)!r} would lie outside {root}", 400)
    return path
