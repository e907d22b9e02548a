"""The ways a run stops early that are not configuration mistakes (light: the command line imports it
before torch)."""
from __future__ import annotations

import signal
from pathlib import Path


class NonFiniteLoss(RuntimeError):
    """A training loss (or gradient) that is inf or nan."""


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; a checkpoint was written."""

    def __init__(self, signum: int, out_dir: Path):
        self.signum, self.out_dir = signum, out_dir
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint written. Continue with: "
                         f"clipcl resume {out_dir}")
