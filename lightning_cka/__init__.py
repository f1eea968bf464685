"""lightning-cka: live minibatch CKA, skip-connection norm ratios and attention distances
for vision models trained with Lightning."""

from typing import TYPE_CHECKING, Any

from lightning_cka import functional
from lightning_cka.attention import AttentionDistance, AttentionDistanceCapture
from lightning_cka.capture import HookSet
from lightning_cka.compare import CKAResult, compare
from lightning_cka.metric import MinibatchCKA
from lightning_cka.norm_ratio import NormRatio, NormRatioCapture

if TYPE_CHECKING:
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
    "compare",
    "functional",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # CKACallback imports Lightning (seconds); load it only when asked for.
    if name == "CKACallback":
        from lightning_cka.callback import CKACallback

        return CKACallback
    raise AttributeError(f"module 'lightning_cka' has no attribute {name!r}")
