"""Fixtures and warning filters shared by every test module.

Helper functions and classes live in ``tests/helpers.py`` (``import helpers as H``), the
independent reference formulas in ``tests/reference.py`` and the 2-process DDP harness in
``tests/ddp_harness.py``.
"""

import sys
from pathlib import Path

import pytest
import torch

# Make `tests/helpers.py`, `tests/reference.py` and `tests/ddp_harness.py` importable from every
# test module (spawned children get the folder on PYTHONPATH from the harness).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers as H

# Third-party noise that says nothing about lightning_cka. Warnings a test provokes on purpose are
# asserted there (pytest.warns / helpers.warns) or filtered on that test with a reason.
KNOWN_WARNINGS = (
    # Lightning's pytree helpers on a newer torch
    r"ignore:.isinstance\(treespec, LeafSpec\). is deprecated:FutureWarning",
)


def pytest_configure(config: pytest.Config) -> None:
    for line in KNOWN_WARNINGS:
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Run every test with one torch thread: tiny models on a busy 2-core machine are faster so."""
    yield from H.one_thread()


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator, so every test draws the same data."""
    return torch.Generator().manual_seed(1234)
