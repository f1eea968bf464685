"""``python -m lightning_cka demo``."""

import sys

from lightning_cka.cli import main

sys.exit(main())
