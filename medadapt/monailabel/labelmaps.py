"""Network outputs to what an annotator sees: label maps with integer values, class scores.

A label map holds one integer per pixel, as MONAI Label viewers expect. Sigmoid (multi-label)
outputs become 1..K by channel, later channels painted over earlier ones; softmax outputs are
their argmax. BraTS' TC / WT / ET channels become the release's own label values, so a saved
label can be read back by `ConvertBraTSLabels` for training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medadapt.data.brats_labels import RELEASES, canonical_release, release_from_name

DEFAULT_BRATS_RELEASE = "2021"


def resolve_release(release: str, filename: str | None = None) -> str:
    """A concrete BraTS release for writing labels: "auto" asks the file name, else 2021."""
    if str(release).lower() != "auto":
        return canonical_release(release)
    return (release_from_name(filename) if filename else None) or DEFAULT_BRATS_RELEASE


def _only(values: set[int], what: str, release: str) -> int:
    if len(values) != 1:
        raise ValueError(f"BraTS release {release!r}: expected one label value for {what}, got {sorted(values)}")
    return next(iter(values))


def brats_label_values(release: str) -> dict[str, int]:
    """The release's label value for each of the three regions a label map can show."""
    spec = RELEASES[canonical_release(release)]
    return {
        "edema": _only(set(spec.wt) - set(spec.tc), "edema", spec.name),
        "core": _only(set(spec.tc) - set(spec.et), "the non-enhancing core", spec.name),
        "enhancing": _only(set(spec.et), "the enhancing tumour", spec.name),
    }


def brats_label_names(release: str) -> dict[str, int]:
    """MONAI Label ``labels`` ({name: value}) for a BraTS release, named as the release does."""
    spec = RELEASES[canonical_release(release)]
    return {spec.meaning[value]: value for value in sorted(spec.meaning)}


def brats_label_map(probabilities: torch.Tensor | np.ndarray, release: str, threshold: float = 0.5) -> np.ndarray:
    """(3, X, Y, Z) TC / WT / ET probabilities to an (X, Y, Z) uint8 map of the release's values.

    The regions are nested (ET inside TC inside WT) but a network's channels need not be, so
    the map is painted from the outside in: WT as edema, then TC as core, then ET.
    """
    p = torch.as_tensor(np.asarray(probabilities) if not isinstance(probabilities, torch.Tensor) else probabilities)
    if p.ndim != 4 or p.shape[0] != 3:
        raise ValueError(f"expected (3, X, Y, Z) TC/WT/ET probabilities, got shape {tuple(p.shape)}")
    tc, wt, et = (p.detach().cpu().float().numpy() > threshold)
    values = brats_label_values(release)
    out = np.zeros(p.shape[1:], dtype=np.uint8)
    out[wt] = values["edema"]
    out[tc] = values["core"]
    out[et] = values["enhancing"]
    return out


def segmentation_label_names(channel_names: Sequence[str], multilabel: bool) -> dict[str, int]:
    """MONAI Label ``labels`` for a segmentation head: sigmoid channel i (or a single channel)
    is value i + 1; softmax channel 0 is the background and channel i is value i."""
    names = list(channel_names)
    if multilabel or len(names) == 1:
        return {name: i + 1 for i, name in enumerate(names)}
    return {name: i for i, name in enumerate(names) if i > 0}


def segmentation_label_map(logits: torch.Tensor, size: Sequence[int], multilabel: bool,
                           threshold: float = 0.5) -> np.ndarray:
    """(K, h, w) logits to an (H, W) uint8 label map at the image's own ``size`` = (H, W).

    Logits are resized bilinearly before thresholding, which gives smoother borders than
    resizing a label map with nearest neighbours.
    """
    logits = torch.as_tensor(logits).detach().cpu().float()
    if logits.ndim != 3:
        raise ValueError(f"expected (K, H, W) logits, got shape {tuple(logits.shape)}")
    resized = F.interpolate(logits[None], size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)[0]
    if multilabel or resized.shape[0] == 1:
        above = (resized.sigmoid() > threshold).numpy()
        out = np.zeros(resized.shape[1:], dtype=np.uint8)
        for i, mask in enumerate(above):
            out[mask] = i + 1
        return out
    return resized.argmax(dim=0).numpy().astype(np.uint8)


def class_scores(logits: torch.Tensor, class_names: Sequence[str], multilabel: bool = False) -> list[dict]:
    """Per-class scores [{"idx", "label", "score"}] from (K,) logits, best first."""
    logits = torch.as_tensor(logits).detach().cpu().float().reshape(-1)
    names = list(class_names)
    if len(names) != logits.numel():
        raise ValueError(f"{logits.numel()} outputs but {len(names)} class names ({names})")
    scores = logits.sigmoid() if multilabel else logits.softmax(dim=0)
    order = torch.argsort(scores, descending=True).tolist()
    return [{"idx": i, "label": names[i], "score": round(float(scores[i]), 6)} for i in order]
