"""Cached encoder features for methods whose training never changes the encoder's output.

Linear probing and CLAdapter's stage 1 train only what comes after a frozen encoder (the
method's config says so: ``config.encoder_output_fixed(stage)``), so the encoder can run once
under ``no_grad`` and every later epoch reads its features from memory.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.nn as nn

from medadapt.adapters.wrappers import Adapted
from medadapt.injection import disable_adapters, encoder_output_fixed, injection_record

logger = logging.getLogger("medadapt")


def output_adapter(model: nn.Module) -> nn.Module | None:
    """The module the method applies to the encoder's output (CLAdapter), or None when there
    is none (linear probing). Raises unless the model's encoder output is fixed at its stage."""
    record = injection_record(model)
    if record is None or not encoder_output_fixed(model):
        method = None if record is None else record["method"]
        stage = None if record is None else record.get("stage", 1)
        raise ValueError(f"cached features need a frozen encoder whose output training cannot change "
                         f"(linear probing, CLAdapter stage 1), not {method!r} at stage {stage}")
    wrappers = [m for m in model.modules() if isinstance(m, Adapted) and m.mode == "replace"]
    if not wrappers:
        return None
    if wrappers[0].adapter.layout.kind != "channels_first":
        raise ValueError("cached CLAdapter features are supported for encoders with NCHW outputs (SAM, LiteMedSAM, CNNs)")
    return wrappers[0].adapter


@torch.no_grad()
def cache_features(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(features, target) per batch: what the model's head pools, without the output adapter."""
    was_training = model.training
    model.eval()
    cached = []
    with disable_adapters(model):
        for x, y in batches:
            cached.append((model.features(x), y))
    model.train(was_training)
    return cached


def head_forward(model: nn.Module, features: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
    """What a Classifier computes from cached encoder features: [CLAdapter] -> pool -> head."""
    if adapter is not None:
        features = adapter(features)
    return model.head(model.pooled(features))


class FeatureCacheInferer:
    """A training inferer that reads a classifier's encoder features from memory whenever its
    method's training cannot change them (linear probing; CLAdapter's stage 1), and runs
    ``inferer`` otherwise.

    Features are kept per sample, keyed by the sample's content, so they are reused when the
    same input comes again: every epoch once the training transforms are deterministic
    (``--train#preprocessing %validate#preprocessing``). When the inputs differ every epoch
    (random augmentation) nothing repeats: after a whole epoch without a hit the cache empties
    itself and stays off. At most ``max_bytes`` of features are kept.

    Arguments:
      inferer: the inferer for everything else (and for the uncached samples' encoder).
      enabled: "auto" (as above) or False.
      max_bytes: memory bound of the cache.
    """

    def __init__(self, inferer, enabled: bool | str = "auto", max_bytes: int = 4 * 2**30):
        if enabled not in ("auto", False, "false", "False"):
            raise ValueError(f"option 'feature_cache' must be 'auto' or false, got {enabled!r}")
        self.inferer = inferer
        self.enabled = enabled == "auto"
        self.max_bytes = int(max_bytes)
        self.cache: dict[str, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.seen = 0  # in the current epoch
        self.epochs = 0

    def _usable(self, network: nn.Module) -> bool:
        model = getattr(network, "module", network)
        if not (self.enabled and hasattr(model, "features") and hasattr(model, "head")):
            return False
        if injection_record(model) is None or not encoder_output_fixed(model):
            return False
        return torch.is_grad_enabled()  # training only: evaluation runs the network as it is

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs):
        if args or kwargs or not self._usable(network):
            return self.inferer(inputs, network, *args, **kwargs)
        model = getattr(network, "module", network)
        keys = [content_key(sample) for sample in inputs]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        computed = {}
        if missing:
            computed = dict(zip(missing, _encode(model, inputs[missing])))
        self.hits += len(keys) - len(missing)
        self.seen += len(keys)
        for i, features in computed.items():
            size = features.numel() * features.element_size()
            if self.bytes + size <= self.max_bytes:
                self.cache[keys[i]] = features
                self.bytes += size
        features = torch.stack([computed[i] if i in computed else self.cache[key] for i, key in enumerate(keys)])
        return head_forward(model, features, output_adapter(model))

    def epoch_completed(self) -> None:
        """At the end of each training epoch: after the first (which can only fill the cache),
        an epoch in which the cache was filled but no input came again turns it off."""
        self.epochs += 1
        if self.enabled and self.epochs >= 2 and self.cache and not self.hits:
            logger.info("feature cache off: no training input came again (random augmentation)")
            self.enabled = False
            self.cache.clear()
            self.bytes = 0
        elif self.seen:
            logger.info("feature cache: %d of %d training samples read from memory (%.0f MB kept)", self.hits,
                        self.seen, self.bytes / 2**20)
        self.hits = self.seen = 0


def content_key(sample: torch.Tensor) -> str:
    """A digest of a tensor's values and shape: equal tensors, equal keys."""
    import hashlib

    data = sample.detach().cpu().contiguous()
    return hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest() + str(tuple(data.shape))


@torch.no_grad()
def _encode(model: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    """The encoder features of ``inputs`` without the output adapter, one tensor per sample."""
    was_training = model.training
    model.eval()
    with disable_adapters(model):
        features = model.features(inputs)
    model.train(was_training)
    return list(features)


class FeatureCacheEpochs:
    """Trainer handler: tells a `FeatureCacheInferer` when an epoch ends."""

    def __init__(self, inferer):
        self.inferer = inferer

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if isinstance(self.inferer, FeatureCacheInferer):
            engine.add_event_handler(Events.EPOCH_COMPLETED, lambda _: self.inferer.epoch_completed())
