"""Analyses of adapted models: the effective receptive field (``medadapt erf``)."""

from medadapt.analysis.erf import (
    DEFAULT_THRESHOLDS,
    VolumeERF,
    compare_erf,
    effective_receptive_field,
    feature_map,
    feature_maps,
    format_ratios,
    high_contribution_area_ratio,
    measure_erfs,
    normalise_erf,
    plot_erfs,
    scaled_for_ratio,
    volume_effective_receptive_field,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "VolumeERF",
    "compare_erf",
    "effective_receptive_field",
    "feature_map",
    "feature_maps",
    "format_ratios",
    "high_contribution_area_ratio",
    "measure_erfs",
    "normalise_erf",
    "plot_erfs",
    "scaled_for_ratio",
    "volume_effective_receptive_field",
]
