"""Where a bundle is: its configs name their folder so that nothing depends on the cwd."""

from __future__ import annotations

import inspect
from pathlib import Path


def bundle_root(name: str) -> str:
    """The folder of bundle ``name`` as it is being run.

    MONAI 1.6 does not pass a config the location of its own file, but the workflow parsing it
    knows it (``ConfigWorkflow.config_root_path``), so the call stack is searched for that
    workflow. Outside one (a plain ``ConfigParser``), the bundle of this source checkout.
    MONAI Label sets ``bundle_root`` itself.
    """
    from monai.bundle import ConfigWorkflow

    frame = inspect.currentframe()
    while frame is not None:
        workflow = frame.f_locals.get("self")
        if isinstance(workflow, ConfigWorkflow):
            folder = Path(workflow.config_root_path)
            return str((folder.parent if folder.name == "configs" else folder).resolve())
        frame = frame.f_back
    return str(repository_bundles() / name)


def repository_bundles() -> Path:
    """The ``bundles`` folder of the source checkout medadapt runs from."""
    return Path(__file__).resolve().parents[2] / "bundles"
