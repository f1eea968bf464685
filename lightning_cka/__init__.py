"""lightning-cka: live minibatch CKA, skip-connection norm ratios, attention distances, layer
convergence, linear probes and localization maps for vision models trained with Lightning."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from lightning_cka import functional
from lightning_cka.attention import AttentionDistance, AttentionDistanceCapture
from lightning_cka.capture import HookSet
from lightning_cka.compare import CKAResult, compare
from lightning_cka.metric import MinibatchCKA
from lightning_cka.norm_ratio import NormRatio, NormRatioCapture
from lightning_cka.running_mean import RunningMean

if TYPE_CHECKING:
    from lightning_cka.analyses.convergence import convergence
    from lightning_cka.analyses.localization import localization, plot_localization
    from lightning_cka.analyses.probe import linear_probe
    from lightning_cka.callback import CKACallback

__all__ = [
    "AttentionDistance",
    "AttentionDistanceCapture",
    "CKACallback",
    "CKAResult",
    "HookSet",
    "MinibatchCKA",
    "NormRatio",
    "NormRatioCapture",
    "RunningMean",
    "compare",
    "convergence",
    "functional",
    "linear_probe",
    "localization",
    "plot_localization",
]
__version__ = "0.2.0"

# Loaded on first use: these import Lightning, which takes seconds.
_LAZY = {
    "CKACallback": "lightning_cka.callback",
    "convergence": "lightning_cka.analyses.convergence",
    "localization": "lightning_cka.analyses.localization",
    "plot_localization": "lightning_cka.analyses.localization",
    "linear_probe": "lightning_cka.analyses.probe",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_cka' has no attribute {name!r}")
