import sys
from pathlib import Path

import pytest
import torch

# Make `tests/reference.py` importable as `reference` from every test module (and spawned children).
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator, so every test draws the same data."""
    return torch.Generator().manual_seed(1234)
