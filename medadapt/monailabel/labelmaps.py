"""Network outputs to what an annotator sees: label maps with integer values, class scores.

A label map holds one integer per pixel, as MONAI Label viewers expect. Sigmoid (multi-label)
outputs become 1..K by channel, later channels painted over earlier ones; softmax outputs are
their argmax. (Bundle models' label maps are their bundle's ``label_map``.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


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
