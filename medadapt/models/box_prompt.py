"""MedSAM-style box-prompted segmentation with an adapted encoder.

Boxes always come from the caller: at inference from a user or viewer, during training from
the labels through :func:`boxes_from_masks` with random jitter, as MedSAM trains. The model
itself never looks at labels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medadapt.backbones import Backbone


class BoxPromptSegmenter(nn.Module):
    """Adapted image encoder + SAM prompt encoder + SAM mask decoder.

    Arguments:
      backbone: a SAM-family backbone whose output is the 256-channel image embedding
        (``medsam_vit_b`` or ``litemedsam``).
      prompt_encoder: SAM PromptEncoder matching the backbone's input and embedding sizes.
      mask_decoder: SAM MaskDecoder.
      train_mask_decoder: the decoder trains with the adapters (MedSAM fine-tunes it); the
        prompt encoder stays frozen.
      preprocess: apply the backbone's normalisation preset to [0, 1] input.
    """

    def __init__(self, backbone: Backbone, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 train_mask_decoder: bool = True, preprocess: bool = True):
        super().__init__()
        if backbone.img_size is None:
            raise ValueError(f"{backbone.name} has no fixed input size; box prompts need a SAM-family backbone")
        self.backbone = backbone
        self.prompt_encoder = prompt_encoder.requires_grad_(False)
        self.mask_decoder = mask_decoder.requires_grad_(train_mask_decoder)
        self.preprocess = preprocess

    def forward(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Mask logits (B, 1, H, W) for one box (x0, y0, x1, y1) per image, in pixels of ``x``."""
        if boxes.ndim != 2 or boxes.shape != (x.shape[0], 4):
            raise ValueError(f"boxes must be (B, 4) = (x0, y0, x1, y1) per image, got {tuple(boxes.shape)}")
        return self.decode(self.encode(x), boxes, x.shape[-2:])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The image embeddings of images ``x`` (B, 3, H, W): resized to the encoder's square
        input and normalised. They do not depend on the box, so one embedding serves every box
        on the same image (as SAM's predictor keeps it)."""
        size = self.backbone.img_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        if self.preprocess:
            x = self.backbone.preprocess(x)
        return self.backbone(x)

    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Mask logits (B, 1, *size) from ``encode``'s embeddings and one box per image, given in
        pixels of the images of ``size`` = (H, W) they were encoded from."""
        h, w = size
        side = self.backbone.img_size
        # The prompt parts run in their weights' dtype, whatever precision the encoder ran in
        # (box propagation may encode in bfloat16).
        dtype = next(self.mask_decoder.parameters()).dtype
        embedding = embedding.to(dtype)
        scale = torch.tensor([side / w, side / h, side / w, side / h], dtype=dtype, device=embedding.device)
        sparse, dense = self.prompt_encoder(points=None, boxes=(boxes.to(dtype) * scale)[:, None, :], masks=None)
        low_res, _ = self.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return F.interpolate(low_res, size=(h, w), mode="bilinear", align_corners=False)


def boxes_from_masks(masks: torch.Tensor, jitter: int = 20, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training boxes (B, 4) around each mask (B, 1, H, W), each side moved by up to ``jitter``
    pixels at random (MedSAM's 0-20 px), clipped to the image; an empty mask gets the image."""
    b, _, h, w = masks.shape
    boxes = torch.tensor([[0, 0, w - 1, h - 1]], dtype=torch.float32).repeat(b, 1)
    for i in range(b):
        ys, xs = torch.nonzero(masks[i, 0] > 0, as_tuple=True)
        if len(xs):
            boxes[i] = torch.tensor([xs.min(), ys.min(), xs.max(), ys.max()], dtype=torch.float32)
    if jitter:
        shift = torch.randint(0, jitter + 1, (b, 4), generator=generator).float()
        boxes = boxes + shift * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    limit = torch.tensor([w - 1, h - 1, w - 1, h - 1], dtype=torch.float32)
    return torch.minimum(boxes.clamp_min(0), limit).to(masks.device)
