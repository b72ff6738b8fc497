"""3D interactive segmentation with a 2D box-prompted model: one box, a whole object.

The user draws a box on one slice of a single-channel volume. That slice is segmented with
the box, and the mask is carried slice by slice in both directions: each next slice gets the
bounding box of its neighbour's mask, enlarged a little (`grow`) so that an object widening
from slice to slice is not cut off. Propagation stops where the object ends: the slice is
blank inside the box (nothing to segment), the mask is empty (fewer than `min_pixels`), has
vanished to a sliver of the mask it started from (`min_area_fraction`), or the model is unsure
of it (under `min_confidence` of its voxels above probability 0.9: SAM-family models still
draw a weak blob in a box over empty background, e.g. above a skull-stripped brain, with at
most a few per cent of its voxels sure, where an object's slices have a tenth or more; see
docs/box3d.md for the measurements behind the default). More
boxes on other slices correct the result: a slice with a user box always uses that box, and
propagation continues from every given box; between two boxes each slice is segmented from
the nearer one.

Boxes are ``[x0, y0, x1, y1]`` in voxel indices of the slice ``volume.take(k, axis=a)``: x
indexes its columns (the second remaining axis), y its rows (the first), both ends inclusive.

Intensities are windowed as MedSAM does for MR (`window_volume`: the 0.5-99.5 percentiles of
the non-zero voxels to [0, 1], over the whole volume); each slice is then given to the model as
three identical channels, which resizes it to its input size (256 x 256 for LiteMedSAM) and
rescales it to its own range, as MedSAM's inference does per slice.

Works with any model called as ``model(images (B, 3, H, W), boxes (B, 4)) -> logits (B, 1, H, W)``
with boxes in pixels of the images, such as `medadapt.models.BoxPromptSegmenter`. A model that
also has ``encode(images) -> embeddings`` and ``decode(embeddings, boxes, (H, W)) -> logits``
(BoxPromptSegmenter has) is run in two parts, which is what makes propagation interactive on a
CPU: the image encoder is nearly all of the work and does not depend on the box, so

- each slice is encoded at most once, and only when propagation reaches it;
- the embeddings are kept in a bounded `EmbeddingCache` shared by all requests (by default
  one per process), keyed by the model and its weights' state, the volume's content, the axis
  and the slice, so another box or a correction on the same volume encodes nothing again;
- on a CPU with native bfloat16 support the encoder runs under bfloat16 autocast
  (``precision="auto"``; docs/box3d.md has its speed and accuracy), the prompt encoder and
  mask decoder in float32.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from medadapt.engine.features import content_key

Box = Sequence[float]

# Why a propagation run ended (values of `BoxPropagation.stops`).
STOP_BLANK = "blank"  # the slice holds one value inside the box: nothing to segment
STOP_EMPTY = "empty"  # the mask had fewer than min_pixels
STOP_VANISHED = "vanished"  # the mask shrank below min_area_fraction of the one it started from
STOP_UNSURE = "unsure"  # under min_confidence of the mask's voxels had probability > CONFIDENT
STOP_EDGE = "edge"  # the last slice of the volume (or of slice_range) was reached
CONFIDENT = 0.9  # a voxel the model is sure of
# The share of sure voxels under which a propagated mask is "unsure". LiteMedSAM on the MNI152
# brain (2 and 4 mm, three axes, float32 and bfloat16; benchmarks/box3d_stopping.py): a blob
# over the empty slice past the top of the 4 mm brain 0.008-0.015, the brain's own slices down
# to 0.10 (0.2, the old default, ended runs far inside the brain).
MIN_CONFIDENCE = 0.05
PRECISIONS = ("auto", "float32", "bfloat16")  # what the image encoder runs in (`propagate_boxes`)


@dataclass
class BoxPropagation:
    """The result of `propagate_boxes`.

    Attributes:
      mask: uint8 volume of the input's shape, 1 inside the object.
      axis: the slicing axis.
      boxes: slice index -> the box that slice was segmented with (user or propagated).
      prompted: the slices that had a user box.
      stops: (slice index, reason) per run that ended on its own: the first slice NOT kept
        and why ("blank", "empty", "vanished", "unsure"), or the last slice of the volume or
        of ``slice_range`` ("edge"). Runs between two boxes that reach the slices of the
        other box's run record nothing.
      encoded: the slices this call ran the image encoder on, in order (empty for models
        without ``encode``/``decode``).
      reused: the slices whose embedding came from the cache (an earlier request).
      confidence: slice index -> the share of its mask's voxels the model was sure of
        (probability above 0.9), for every slice the model segmented, the slices that ended a
        run included (what ``min_confidence`` is compared with).
      precision: what the image encoder ran in ("float32" or "bfloat16"; None for models
        without ``encode``/``decode``).
    """

    mask: np.ndarray
    axis: int
    boxes: dict[int, list[float]] = field(default_factory=dict)
    prompted: list[int] = field(default_factory=list)
    stops: list[tuple[int, str]] = field(default_factory=list)
    encoded: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    confidence: dict[int, float] = field(default_factory=dict)
    precision: str | None = None

    @property
    def slices(self) -> list[int]:
        """Slices holding part of the object."""
        other = tuple(a for a in range(self.mask.ndim) if a != self.axis)
        return [int(k) for k in np.flatnonzero(self.mask.any(axis=other))]


def window_volume(volume: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """MedSAM's MR windowing: clip to the ``percentiles`` of the non-zero voxels, scale to [0, 1].

    A volume without non-zero voxels (or a constant one) becomes all zeros.
    """
    volume = np.asarray(volume, dtype=np.float32)
    values = volume[volume != 0]
    if values.size == 0:
        return np.zeros_like(volume)
    low, high = np.percentile(values, percentiles)
    if high <= low:
        return (volume != 0).astype(np.float32)
    return ((np.clip(volume, low, high) - low) / (high - low)).astype(np.float32)


def check_box(box: Box, rows: int, cols: int, where: str = "box") -> list[float]:
    """``box`` as four floats [x0, y0, x1, y1] inside a ``rows`` x ``cols`` slice (inclusive
    voxel indices, x0 <= x1 < cols, y0 <= y1 < rows); ValueError naming ``where`` otherwise."""
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{where} {box!r} is not four numbers [x0, y0, x1, y1]") from None
    if len(values) != 4 or not all(np.isfinite(values)):
        raise ValueError(f"{where} {box!r} is not four finite numbers [x0, y0, x1, y1]")
    x0, y0, x1, y1 = values
    if x0 > x1 or y0 > y1:
        raise ValueError(f"{where} {values} is reversed: it needs x0 <= x1 and y0 <= y1")
    if x0 < 0 or y0 < 0 or x1 > cols - 1 or y1 > rows - 1:
        raise ValueError(f"{where} {values} lies outside the slice: x (columns) must lie in [0, {cols - 1}] and "
                         f"y (rows) in [0, {rows - 1}], both ends inclusive")
    return values


def box_of_mask(mask: np.ndarray, grow: float = 0.1, min_grow: float = 1.0) -> list[float] | None:
    """The inclusive bounding box [x0, y0, x1, y1] of a 2D ``mask``, each side moved out by
    ``grow`` times the box's size on that axis (at least ``min_grow`` voxels) and clipped to
    the slice; None for an empty mask."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    x0, x1, y0, y1 = cols.min(), cols.max(), rows.min(), rows.max()
    dx = max(min_grow, grow * (x1 - x0 + 1))
    dy = max(min_grow, grow * (y1 - y0 + 1))
    height, width = mask.shape
    return [float(max(0, x0 - dx)), float(max(0, y0 - dy)), float(min(width - 1, x1 + dx)),
            float(min(height - 1, y1 + dy))]


class EmbeddingCache:
    """Image embeddings of slices kept between requests: least recently used first out, at
    most ``max_bytes`` in all (an embedding larger than that is not kept).

    Keys are tuples that start with `model_key`: a token for the model object, never reused,
    and its weights' state. A model whose weights change in place (adapters loaded or trained)
    gets new keys, and a garbage-collected model's entries are dropped (a served model rebuilt
    with new adapters), so a stale embedding is never used. Safe to share between threads.

    Arguments:
      max_bytes: the memory bound.
    """

    def __init__(self, max_bytes: int = 2**30):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._tokens: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
        self._next_token = itertools.count()
        self._dead: list[int] = []  # tokens of collected models, dropped at the next put
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            embedding = self._entries.get(key)
            if embedding is not None:
                self._entries.move_to_end(key)
            return embedding

    def put(self, key: tuple, embedding: torch.Tensor) -> None:
        size = embedding.numel() * embedding.element_size()
        with self._lock:
            self._drop_dead_models()
            if size > self.max_bytes or key in self._entries:
                return
            self._entries[key] = embedding
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, oldest = self._entries.popitem(last=False)
                self.nbytes -= oldest.numel() * oldest.element_size()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def model_key(self, model: nn.Module) -> tuple:
        """(token, weights' state) of ``model``: the start of its entries' keys."""
        with self._lock:
            token = self._tokens.get(model)
            if token is None:
                token = self._tokens[model] = next(self._next_token)
                # Only noted here: the finaliser may run inside a locked section of this thread.
                weakref.finalize(model, self._dead.append, token)
        return token, _weights_state(model)

    def _drop_dead_models(self) -> None:
        while self._dead:
            token = self._dead.pop()
            for key in [key for key in self._entries if key[0] == token]:
                embedding = self._entries.pop(key)
                self.nbytes -= embedding.numel() * embedding.element_size()


def _weights_state(model: nn.Module) -> int:
    """Changes whenever a tensor of ``model``'s state dict (parameters, persistent buffers) is
    replaced or written in place: torch counts every in-place write in a tensor's version.
    Buffers outside the state dict are derived from it, e.g. TinyViT's attention biases, which
    every ``eval()`` rebuilds."""
    tensors = model.state_dict(keep_vars=True).values()
    return hash(tuple((id(t), t._version) for t in tensors if isinstance(t, torch.Tensor) and not t.is_inference()))


def _shared_cache_bytes() -> int:
    value = os.environ.get("MEDADAPT_EMBEDDING_CACHE_MB", "1024")
    try:
        return int(float(value) * 2**20)
    except ValueError:
        raise ValueError(f"MEDADAPT_EMBEDDING_CACHE_MB must be a number of megabytes, got {value!r}") from None


_shared_cache: EmbeddingCache | None = None


def shared_embedding_cache() -> EmbeddingCache:
    """The process's `EmbeddingCache` that `propagate_boxes` uses by default (and so every
    request of a server): ``MEDADAPT_EMBEDDING_CACHE_MB`` megabytes, 1024 unless set."""
    global _shared_cache
    if _shared_cache is None:
        _shared_cache = EmbeddingCache(_shared_cache_bytes())
    return _shared_cache


def _encodes_apart(model: nn.Module) -> bool:
    """Whether ``model`` has ``encode``/``decode``, so its encoder can run once per slice."""
    return callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))


def encoder_precision(precision: str, device: torch.device) -> str:
    """What the image encoder runs in on ``device`` for a `propagate_boxes` ``precision``:
    "auto" is bfloat16 on a CPU that runs it natively, float32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if device.type == "cpu" and _cpu_runs_bfloat16() else "float32"
    return precision


def _cpu_runs_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX-512 or AMX); elsewhere bfloat16
    would be emulated and slower than float32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class _SliceEmbeddings:
    """The image embeddings of one volume's slices during one request: from the cache, or
    encoded when propagation first reaches the slice, each slice at most once. With
    ``batch`` > 1 the next uncached slices in the direction of travel are encoded with it
    (they do not depend on the box, only on the image). In ``bfloat16`` the encoder runs under
    autocast and its embeddings are kept in bfloat16, half the memory."""

    def __init__(self, model: nn.Module, images: Callable[[list[int]], torch.Tensor], key: tuple,
                 cache: EmbeddingCache | None, extent: tuple[int, int], batch: int, bfloat16: bool):
        self.model, self.images, self.key, self.cache = model, images, key, cache
        self.extent, self.batch, self.bfloat16 = extent, batch, bfloat16
        self.encoded: list[int] = []
        self.reused: list[int] = []
        self._ahead: dict[int, torch.Tensor] = {}  # encoded with an earlier slice, not used yet

    def __call__(self, k: int, step: int) -> torch.Tensor:
        """The (1, C, h, w) embedding of slice ``k``, propagation going ``step`` (+1 or -1)."""
        if k in self._ahead:
            return self._ahead.pop(k)
        cached = self.cache.get(self.key + (k,)) if self.cache is not None else None
        if cached is not None:
            self.reused.append(k)
            return cached
        todo = self._batch_from(k, step)
        embeddings = self._encode(self.images(todo)).split(1)
        for j, embedding in zip(todo, embeddings):
            if len(todo) > 1:
                embedding = embedding.clone()  # its own memory, not a view that keeps the whole batch
            self.encoded.append(j)
            if self.cache is not None:
                self.cache.put(self.key + (j,), embedding)
            if j != k:
                self._ahead[j] = embedding
        return embeddings[0]

    def _batch_from(self, k: int, step: int) -> list[int]:
        todo, j = [k], k + step
        while len(todo) < self.batch and self.extent[0] <= j <= self.extent[1] and not self._available(j):
            todo.append(j)
            j += step
        return todo

    def _available(self, k: int) -> bool:
        return k in self._ahead or k in self.encoded or (self.cache is not None and self.key + (k,) in self.cache)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        if not self.bfloat16:
            return self.model.encode(images)
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            return self.model.encode(images).to(torch.bfloat16)


class _SliceSegmenter:
    """The model on single slices of a windowed volume: a mask per (slice, box)."""

    def __init__(self, model: nn.Module, volume: np.ndarray, axis: int, threshold: float, device):
        self.model, self.volume, self.axis, self.threshold = model, volume, axis, threshold
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.embeddings: _SliceEmbeddings | None = None  # set for models that encode apart

    def images(self, slices: list[int]) -> torch.Tensor:
        """Slices as the model's input: (len(slices), 3, rows, cols), three identical channels."""
        stack = torch.from_numpy(np.stack([self.volume.take(k, axis=self.axis) for k in slices]))
        return stack[:, None].expand(len(slices), 3, *stack.shape[1:]).to(self.device)

    def __call__(self, k: int, box: list[float], step: int = 1) -> tuple[np.ndarray, float]:
        """The mask on slice ``k`` for ``box``, and the share of its voxels the model is sure of
        (``step``: the direction propagation goes, for encoding ahead)."""
        boxes = torch.tensor([box], dtype=torch.float32, device=self.device)
        if self.embeddings is None:
            logits = self.model(self.images([k]), boxes)
        else:
            size = tuple(s for a, s in enumerate(self.volume.shape) if a != self.axis)
            logits = self.model.decode(self.embeddings(k, step), boxes, size)
        probability = torch.sigmoid(logits.float())[0, 0].cpu().numpy()
        mask = probability > self.threshold
        return mask, float((probability[mask] > CONFIDENT).mean()) if mask.any() else 0.0

    def blank(self, k: int, box: list[float]) -> bool:
        """Whether slice ``k`` holds a single value inside ``box`` (no model call needed)."""
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        inside = self.volume.take(k, axis=self.axis)[y0:y1 + 1, x0:x1 + 1]
        return inside.size == 0 or float(inside.max()) == float(inside.min())


def _slice_embeddings(segment: _SliceSegmenter, cache: EmbeddingCache | bool, extent: tuple[int, int], batch: int,
                      precision: str) -> _SliceEmbeddings:
    # Not ``cache or None``: an empty cache is falsy (it has a length).
    store = shared_embedding_cache() if cache is True else None if cache is False else cache
    precision = encoder_precision(precision, segment.device)
    key = ()
    if store is not None:
        # Everything the embedding of a slice depends on: the model and its weights, the image
        # (after windowing), the axis, the encoder's precision and the device.
        key = (*store.model_key(segment.model), content_key(torch.from_numpy(segment.volume)), segment.axis,
               precision, str(segment.device))
    return _SliceEmbeddings(segment.model, segment.images, key, store, extent, batch, precision == "bfloat16")


def propagate_boxes(
    model: nn.Module,
    volume: np.ndarray,
    boxes: Mapping[int, Box],
    axis: int = 2,
    *,
    grow: float = 0.1,
    min_pixels: int = 4,
    min_area_fraction: float = 0.05,
    min_confidence: float = MIN_CONFIDENCE,
    threshold: float = 0.5,
    window: bool = True,
    slice_range: tuple[int, int] | None = None,
    device: str | torch.device | None = None,
    cache: EmbeddingCache | bool = True,
    precision: str = "auto",
    encode_batch: int = 1,
) -> BoxPropagation:
    """Segment the object the user boxed on one or more slices through the whole volume.

    Arguments:
      model: a box-prompted 2D model (see the module docstring), used in eval mode.
      volume: a single-channel 3D array (or tensor).
      boxes: slice index on ``axis`` -> user box [x0, y0, x1, y1] (inclusive voxel indices
        of that slice, x = columns, y = rows).
      axis: the slicing axis (0, 1 or 2).
      grow: each propagated box is the neighbour mask's bounding box enlarged on every side
        by this fraction of its size (at least one voxel).
      min_pixels: a propagated mask with fewer voxels than this ends the run (empty).
      min_area_fraction: a propagated mask smaller than this fraction of the mask on the slice
        its run started from ends the run (the object vanished).
      min_confidence: a propagated mask with a smaller share of voxels above probability 0.9
        ends the run (the model is unsure; 0 turns the rule off). The default, 0.05, lies
        between what LiteMedSAM gives past the end of an object and on its least sure slices
        (`MIN_CONFIDENCE`).
      threshold: on the sigmoid of the model's logits.
      window: apply `window_volume` first (False: ``volume`` already lies in [0, 1]).
      slice_range: (first, last) slice, inclusive: propagation goes no further (default: the
        whole volume), e.g. the extent of a 3D region of interest the user drew.
      device: where the model runs (default: where its parameters are).

    For models with ``encode``/``decode`` (see the module docstring):

      cache: where slice embeddings are kept for later requests: True, the process's
        `shared_embedding_cache`; an `EmbeddingCache`; False, nowhere (each slice is still
        encoded at most once per call).
      precision: what the image encoder runs in: "auto" (bfloat16 autocast on a CPU that runs
        bfloat16 natively, float32 elsewhere), "float32" or "bfloat16". The prompt encoder and
        mask decoder run in the model's own dtype.
      encode_batch: slices encoded in one forward pass: the slice propagation needs and the
        next ones in its direction, which it may never reach (up to ``encode_batch - 1`` unused
        at each end of a run). On 2 CPU cores a batch of 4 saved 6 to 10 % a slice on a lightly
        loaded machine and 2 % on an idle one (docs/box3d.md); 1 wastes nothing on small
        objects.

    Returns a `BoxPropagation`: the mask and how it was made.
    """
    volume = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be a single-channel 3D array, got shape {volume.shape}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
    if not boxes:
        raise ValueError("give at least one box: {slice index: [x0, y0, x1, y1]}")
    depth = volume.shape[axis]
    first, last = (0, depth - 1) if slice_range is None else (int(slice_range[0]), int(slice_range[1]))
    if not 0 <= first <= last < depth:
        raise ValueError(f"slice_range {slice_range!r} must satisfy 0 <= first <= last < {depth}")
    rows, cols = (s for a, s in enumerate(volume.shape) if a != axis)
    prompts: dict[int, list[float]] = {}
    for k, box in boxes.items():
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not first <= k <= last:
            raise ValueError(f"slice index {k!r} must be an integer in [{first}, {last}] (axis {axis} has {depth} "
                             "slices)")
        prompts[int(k)] = check_box(box, rows, cols, where=f"box on slice {k}")
    if isinstance(encode_batch, bool) or not isinstance(encode_batch, int) or encode_batch < 1:
        raise ValueError(f"encode_batch must be a positive integer, got {encode_batch!r}")

    image = window_volume(volume) if window else volume.astype(np.float32)
    segment = _SliceSegmenter(model, image, axis, threshold, device)
    if _encodes_apart(model):
        segment.embeddings = _slice_embeddings(segment, cache, (first, last), encode_batch, precision)
    was_training = model.training
    model.eval()
    try:
        rules = _Rules(grow, min_pixels, min_area_fraction, min_confidence)
        with torch.inference_mode():
            result = _propagate(segment, prompts, (first, last), rules)
    finally:
        model.train(was_training)
    mask = np.zeros(volume.shape, dtype=np.uint8)
    for k, slice_mask in result.pop("masks").items():
        index = [slice(None)] * 3
        index[axis] = k
        mask[tuple(index)] = slice_mask
    if segment.embeddings is not None:
        embeddings = segment.embeddings
        result.update(encoded=embeddings.encoded, reused=embeddings.reused,
                      precision="bfloat16" if embeddings.bfloat16 else "float32")
    return BoxPropagation(mask=mask, axis=axis, prompted=sorted(prompts), **result)


@dataclass(frozen=True)
class _Rules:
    grow: float
    min_pixels: int
    min_area_fraction: float
    min_confidence: float

    def stop(self, area: int, confident: float, reference: int) -> str | None:
        """Why a propagated mask of ``area`` voxels ends its run, or None to keep it."""
        if area < self.min_pixels:
            return STOP_EMPTY
        if area < self.min_area_fraction * reference:
            return STOP_VANISHED
        if confident < self.min_confidence:
            return STOP_UNSURE
        return None


def _propagate(segment: _SliceSegmenter, prompts: dict[int, list[float]], extent: tuple[int, int],
               rules: _Rules) -> dict:
    masks: dict[int, np.ndarray] = {}
    used: dict[int, list[float]] = {}
    confidence: dict[int, float] = {}
    stops: list[tuple[int, str]] = []
    for k, box in prompts.items():  # a user's box is always segmented, whatever the rules say
        (masks[k], confidence[k]), used[k] = segment(k, box), box
    given = sorted(prompts)

    def run(start: int, step: int, limit: int) -> int:
        """Carry the mask of ``start`` towards ``limit`` (exclusive); the last slice kept."""
        reference = max(int(masks[start].sum()), 1)
        previous, k = masks[start], start + step
        while k != limit:
            box = box_of_mask(previous, rules.grow)
            if box is None:
                stops.append((k, STOP_EMPTY))
                return k - step
            if segment.blank(k, box):
                stops.append((k, STOP_BLANK))
                return k - step
            current, confident = segment(k, box, step)
            confidence[k] = confident
            reason = rules.stop(int(current.sum()), confident, reference)
            if reason:
                stops.append((k, reason))
                return k - step
            masks[k], used[k], previous = current, box, current
            k += step
        if limit in (extent[0] - 1, extent[1] + 1):  # else the run reached the middle between two boxes
            stops.append((k - step, STOP_EDGE))
        return k - step

    # Outwards from the first and last boxes; between two boxes, each side up to the middle, and
    # the upper one further down if the lower one's run ended early.
    run(given[0], -1, extent[0] - 1)
    for low, high in zip(given, given[1:]):
        reached = run(low, +1, (low + high) // 2 + 1)
        run(high, -1, reached)
    run(given[-1], +1, extent[1] + 1)
    return {"masks": masks, "boxes": dict(sorted(used.items())), "stops": stops,
            "confidence": dict(sorted(confidence.items()))}


def segment_volume_from_box(
    model: nn.Module,
    volume: np.ndarray,
    box: Box,
    slice_index: int,
    axis: int = 2,
    more_boxes: Mapping[int, Box] | None = None,
    **options,
) -> np.ndarray:
    """The object boxed on one slice, segmented through the volume: a uint8 mask of the
    volume's shape (see `propagate_boxes` for ``options`` and the module docstring for the
    box convention).

    Arguments:
      model: a box-prompted 2D model, e.g. ``medadapt.create_model("box_segmentation")``
        (LiteMedSAM with its pretrained weights).
      volume: a single-channel 3D array.
      box: [x0, y0, x1, y1] on slice ``slice_index`` of ``axis``, inclusive voxel indices of
        ``volume.take(slice_index, axis=axis)`` (x = columns, y = rows).
      slice_index, axis: where the box was drawn.
      more_boxes: corrections, {slice index: box}; each of those slices uses its own box.

    Example::

        model = medadapt.create_model("box_segmentation")  # LiteMedSAM
        mask = medadapt.segment_volume_from_box(model, t1, [30, 40, 70, 90], slice_index=47, axis=2)
    """
    boxes = {int(slice_index): box, **dict(more_boxes or {})}
    return propagate_boxes(model, volume, boxes, axis, **options).mask


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
