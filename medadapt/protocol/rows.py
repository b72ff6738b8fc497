"""The rows of a protocol table, as ``--methods`` names them.

- ``dka``, ``adapter``, ``lora``...: a medadapt method at its papers' size (its own defaults);
- ``adapter@iso:dka``: the method sized so that it trains as many parameters as the row ``dka``
  (the iso-parameter comparison the DKA paper's Figure 5 makes);
- ``unet``: a network trained from scratch with MONAI (``monai.networks.nets.UNet``), the
  baseline a clinician would try first, trained by the same bundle recipe (data, loss,
  schedule, checkpoint choice), only its network and optimiser's parameters replaced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ROW = re.compile(r"^(?P<method>[a-z0-9_]+)(?:@iso:(?P<iso>[a-z0-9_@:]+))?$")


@dataclass(frozen=True)
class Row:
    """One row: its ``name`` (as given), the ``method`` it injects (None for a network from
    scratch), the row whose trainable-parameter count it is sized to (``iso``), and the
    from-scratch network it trains (``scratch``)."""

    name: str
    method: str | None
    iso: str | None = None
    scratch: str | None = None

    @property
    def file_name(self) -> str:
        """The row's name as it can stand in a file name."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.name)


def scratch_network(name: str, spatial_dims: int, in_channels: int, num_classes: int) -> dict:
    """The MONAI network config of the from-scratch row ``name`` (a U-Net of four levels; on slice
    stacks it halves only in plane, as a stack has few slices)."""
    if name != "unet":
        raise ValueError(f"unknown network from scratch {name!r}; known: ['unet']")
    strides = [2, 2, 2] if spatial_dims == 2 else [[2, 2, 1]] * 3
    return {"_target_": "monai.networks.nets.UNet", "spatial_dims": spatial_dims, "in_channels": in_channels,
            "out_channels": num_classes, "channels": [16, 32, 64, 128], "strides": strides, "num_res_units": 2}


def parse_rows(names, known_methods) -> list[Row]:
    """The rows of ``names``, checked: known methods, iso targets among the other rows, no repeats."""
    rows = []
    for text in names:
        text = str(text)
        if text == "unet":
            rows.append(Row(text, None, scratch="unet"))
            continue
        match = _ROW.match(text)
        if not match or match["method"] not in known_methods:
            raise ValueError(f"methods (--methods): unknown method {text!r}; choose from {list(known_methods)}, "
                             "'unet' (from scratch), or METHOD@iso:ROW")
        rows.append(Row(text, match["method"], iso=match["iso"]))
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"methods (--methods): {names} repeats a method")
    for row in rows:
        if row.iso is not None and (row.iso not in names or row.iso == row.name):
            raise ValueError(f"methods (--methods): {row.name!r} is sized to {row.iso!r}, which is not another row")
    return rows
