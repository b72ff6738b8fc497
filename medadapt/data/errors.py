"""Errors raised for problems in a dataset on disk.

Every message names the case or file at fault and what is wrong with it, so a user can fix
the data without reading a traceback.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset does not follow its official layout or holds unusable data."""


class MissingFileError(DatasetError, FileNotFoundError):
    """A file the layout requires is absent."""


def format_problems(problems: list[str], what: str, limit: int = 20) -> str:
    """One message listing the first ``limit`` problems, one per line."""
    shown = "\n  - ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{what}: {len(problems)} problem(s) found:\n  - {shown}{more}"


def raise_problems(problems: list[str], what: str, limit: int = 20) -> None:
    """Raise one `DatasetError` listing every problem found (the first ``limit`` of them).

    Collecting problems before raising means a single run reports everything to fix.

    Arguments:
        problems: one line per problem, each naming its file or case.
        what: the thing that was checked, e.g. "BraTS datalist".
        limit: how many problems to print before summarising the rest.
    """
    if problems:
        raise DatasetError(format_problems(problems, what, limit))
