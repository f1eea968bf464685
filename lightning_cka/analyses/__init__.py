"""Analyses: the signals :class:`~lightning_cka.CKACallback` measures, one module each.

- :mod:`~lightning_cka.analyses.base`: the :class:`Analysis` protocol and what flows through it;
- :mod:`~lightning_cka.analyses.cka`: layer x layer and model x reference CKA heatmaps;
- :mod:`~lightning_cka.analyses.norm_ratio`: skip-connection norm ratios;
- :mod:`~lightning_cka.analyses.attention_distance`: mean attention distances;
- :mod:`~lightning_cka.analyses.convergence`: each layer against itself at earlier validations;
- :mod:`~lightning_cka.analyses.probe`: per-layer linear probes;
- :mod:`~lightning_cka.analyses.localization`: spatial localization maps of ViT tokens.
"""

from lightning_cka.analyses.attention_distance import AttentionDistanceAnalysis
from lightning_cka.analyses.base import Analysis, AnalysisSkipped, MeasuredBatch, Report, SetupContext
from lightning_cka.analyses.cka import ReferenceCKA, SelfCKA
from lightning_cka.analyses.convergence import Convergence
from lightning_cka.analyses.localization import Localization
from lightning_cka.analyses.norm_ratio import NormRatioAnalysis
from lightning_cka.analyses.probe import LinearProbe

__all__ = [
    "Analysis",
    "AnalysisSkipped",
    "AttentionDistanceAnalysis",
    "Convergence",
    "LinearProbe",
    "Localization",
    "MeasuredBatch",
    "NormRatioAnalysis",
    "ReferenceCKA",
    "Report",
    "SelfCKA",
    "SetupContext",
]
