"""Output transforms that feed MONAI's and ignite's metric handlers from decollated batches."""

from __future__ import annotations

from collections.abc import Callable

import torch


def select_channel(index: int, keys: tuple[str, str] = ("pred", "label")) -> Callable:
    """One channel of decollated predictions and labels, so a MONAI metric handler reports a
    per-region score (TC, WT, ET)."""

    def transform(output):
        items = output if isinstance(output, list) else [output]
        preds = [item[keys[0]][index : index + 1] for item in items]
        labels = [item[keys[1]][index : index + 1] for item in items]
        return preds, labels

    return transform


def class_output(keys: tuple[str, str] = ("pred", "label")) -> Callable:
    """Stacked logits and class indices, for ignite's classification metrics."""

    def transform(output):
        items = output if isinstance(output, list) else [output]
        pred = torch.stack([torch.as_tensor(item[keys[0]]) for item in items])
        label = torch.stack([torch.as_tensor(item[keys[1]]).reshape(-1)[0] for item in items]).long()
        return pred, label

    return transform


def onehot_output(num_classes: int, keys: tuple[str, str] = ("pred", "label")) -> Callable:
    """One-hot argmax and one-hot label, for MONAI's confusion-matrix metrics."""

    def transform(output):
        pred, label = class_output(keys)(output)
        eye = torch.eye(num_classes, device=pred.device)
        return list(eye[pred.argmax(dim=1)]), list(eye[label])

    return transform


def probability_output(num_classes: int, keys: tuple[str, str] = ("pred", "label")) -> Callable:
    """Softmax probabilities and one-hot labels, for MONAI's ROCAUC."""

    def transform(output):
        pred, label = class_output(keys)(output)
        return list(pred.softmax(dim=1)), list(torch.eye(num_classes, device=pred.device)[label])

    return transform
