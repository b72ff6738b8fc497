"""The adapter methods: one file each, one registry line each.

To add a method: write ``medadapt/adapters/<name>.py`` with a config dataclass (subclass of
:class:`~medadapt.adapters.base.AdapterConfig`, usually :class:`BlockAdapterConfig` with a
``build(dim, layout)``) and add it to ``METHODS`` below. The config carries the method's
lifecycle, so nothing else names it: ``inject(encoder, family)``, ``adapter_parameters``,
``merge``, ``supports(family)``, ``size_option``, ``num_stages``, ``stage_trains(stage)``,
``encoder_output_fixed(stage)`` and ``changes_base_weights``; the modules it puts into a
backbone are :class:`~medadapt.adapters.base.AdapterModule` s (switch, parameters, merge).
"""

from __future__ import annotations

from medadapt.adapters.adaptformer import AdaptFormerConfig
from medadapt.adapters.aim import AIMConfig
from medadapt.adapters.base import (
    AdapterConfig,
    AdapterModule,
    BlockAdapterConfig,
    TokenLayout,
)
from medadapt.adapters.bitfit import BitFitConfig
from medadapt.adapters.ciat import CIATConfig
from medadapt.adapters.cladapter import CLAdapterConfig
from medadapt.adapters.convpass import ConvpassConfig
from medadapt.adapters.dka import DKAConfig
from medadapt.adapters.finetune import FullFineTuneConfig, LinearProbeConfig
from medadapt.adapters.houlsby import HoulsbyConfig
from medadapt.adapters.lka import LKAConfig
from medadapt.adapters.lora import LoRAConfig
from medadapt.adapters.vpt import VPTConfig

METHODS: dict[str, type[AdapterConfig]] = {
    "dka": DKAConfig,
    "lka": LKAConfig,
    "cladapter": CLAdapterConfig,
    "adapter": HoulsbyConfig,
    "adaptformer": AdaptFormerConfig,
    "convpass": ConvpassConfig,
    "lora": LoRAConfig,
    "bitfit": BitFitConfig,
    "vpt": VPTConfig,
    "ciat": CIATConfig,
    "aim": AIMConfig,
    "linear": LinearProbeConfig,
    "full": FullFineTuneConfig,
}


def list_methods() -> list[str]:
    """Names accepted by :func:`medadapt.inject`."""
    return list(METHODS)


def make_config(method: str, options: dict) -> AdapterConfig:
    """The method's config from keyword options; unknown names and values of the wrong type
    (a string for a number, say) are reported with the option's name and what it takes."""
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; choose one of {list_methods()}")
    return METHODS[method].from_options(options, method)


def method_summaries() -> dict[str, str]:
    return {name: cls.summary for name, cls in METHODS.items()}


__all__ = ["METHODS", "AdapterConfig", "AdapterModule", "BlockAdapterConfig", "TokenLayout", "list_methods",
           "make_config", "method_summaries"]
