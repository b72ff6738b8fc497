"""Prompts for box-prompted models, made from the reference masks of a batch."""

from __future__ import annotations

from monai.engines.utils import PrepareBatch, default_prepare_batch

from medadapt.models.box_prompt import boxes_from_masks


class BoxPromptsFromLabels(PrepareBatch):
    """A MONAI ``prepare_batch`` for a box-prompted network: it gets ``(image, boxes)``, each
    box drawn around the sample's reference mask, as MedSAM is trained and evaluated.

    Each side of a box moves outwards by up to ``jitter`` pixels at random (MedSAM: 0-20 in
    training; 0 for validation). The shifts come from torch's global generator, which a
    bundle seeds (``set_determinism``).
    """

    def __init__(self, jitter: int = 0):
        if isinstance(jitter, bool) or not isinstance(jitter, int) or jitter < 0:
            raise ValueError(f"option 'box_jitter' must be a whole number of pixels >= 0, got {jitter!r}")
        self.jitter = jitter

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        boxes = boxes_from_masks(label.detach().cpu(), jitter=self.jitter).to(image.device)
        return image, label, (boxes,), {}
