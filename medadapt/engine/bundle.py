"""Run a bundle's configs from Python, exactly as ``python -m monai.bundle run`` runs them.

The protocol runner, the notebooks and MONAI Label's tasks call these, so every entry point
runs the bundle's recipe and nothing else.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


# What MONAI's config parser reads in a string: "$" starts Python, "@" a reference, "%" a macro,
# and it rewrites "::", "@#" and "%#" wherever they stand.
_PARSED_TEXT = re.compile(r"^[$@%]|::|[@%]#")


def parses_as_itself(text: str) -> bool:
    """Whether MONAI's config parser takes the string ``text`` as the plain text it is."""
    return not _PARSED_TEXT.search(text)


class Verbatim(Mapping):
    """A read-only mapping that MONAI's config parser passes through untouched.

    The parser reads every string inside the dicts and lists of a config (see `parses_as_itself`),
    but does not look inside other objects. Data from outside a bundle (file names, case ids a
    server was sent) is handed to a config as ``Verbatim(data)``: a file named ``$HOME.png`` stays
    a file name, and ``@data['train']`` in the config gets the list as it was.
    """

    def __init__(self, data: Mapping):
        self._data = dict(data)

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Verbatim({self._data!r})"


def _files(config_file: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    files = [config_file] if isinstance(config_file, (str, os.PathLike)) else list(config_file)
    return [str(f) for f in files]


def workflow(config_file, workflow_type: str = "train", **overrides: Any):
    """A MONAI ``ConfigWorkflow`` of the bundle's config file(s) (merged in order) with
    ``overrides``, its metadata and logging config taken from the first file's folder."""
    from monai.bundle import ConfigWorkflow

    files = _files(config_file)
    folder = Path(files[0]).parent
    logging_file = folder / "logging.conf"
    return ConfigWorkflow(config_file=files if len(files) > 1 else files[0], meta_file=str(folder / "metadata.json"),
                          logging_file=str(logging_file) if logging_file.is_file() else False,
                          workflow_type=workflow_type, **overrides)


def run_workflow(config_file, workflow_type: str = "train", **overrides: Any):
    """Initialise, run and finalise the bundle's config file(s) with ``overrides``; returns
    the finished workflow (its ``parser`` holds every component it built)."""
    flow = workflow(config_file, workflow_type, **overrides)
    flow.initialize()
    flow.run()
    flow.finalize()
    return flow


def parsed(config_file, key: str, **overrides: Any):
    """One component of a bundle config (for example ``network_def``), built with ``overrides``
    but without initialising or running the workflow."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(_files(config_file))
    parser.update(dict(overrides))
    return parser.get_parsed_content(key)
