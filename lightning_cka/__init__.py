"""lightning-cka: live minibatch CKA, skip-connection norm ratios and attention distances
for vision models trained with Lightning."""

from lightning_cka import functional
from lightning_cka.callback import CKACallback
from lightning_cka.compare import CKAResult, compare
from lightning_cka.metric import MinibatchCKA

__all__ = ["CKACallback", "CKAResult", "MinibatchCKA", "compare", "functional"]
__version__ = "0.1.0"
