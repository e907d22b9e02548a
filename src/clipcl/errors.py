"""The ways a run stops early that are not configuration mistakes (light: the command line imports it
before torch)."""
from __future__ import annotations

import shlex
import signal
from pathlib import Path

# The signals that ask a run to stop cleanly: Ctrl-C, a kill (SIGTERM: schedulers, `kill`), and a closed
# terminal or ssh session (SIGHUP). A training run writes a checkpoint first (engine.Trainer.run), a sweep
# passes them on to its cells (sweep.run), an interrupted pretraining removes its temporary folder (pretrain.py).
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                                                 if hasattr(signal, name))


def stop_signals() -> tuple[signal.Signals, ...]:
    """The STOP_SIGNALS to catch now: all of them, less SIGHUP while this process ignores it (`nohup` makes a
    run outlive its terminal that way: a hang-up must not stop it then)."""
    return tuple(s for s in STOP_SIGNALS if not (s.name == "SIGHUP" and signal.getsignal(s) == signal.SIG_IGN))


class NonFiniteLoss(RuntimeError):
    """A training loss (or gradient) that is inf or nan."""


class Interrupted(RuntimeError):
    """SIGINT, SIGTERM or SIGHUP arrived; a checkpoint was written."""

    def __init__(self, signum: int, out_dir: Path):
        self.signum, self.out_dir = signum, out_dir
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint written. Continue with: "
                         f"clipcl resume {shlex.quote(str(out_dir))}")


class StoppedEarly(BaseException):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) before anything resumable existed, e.g. during a pretraining.

    A BaseException, as KeyboardInterrupt is: a stop must not be taken for an error by `except Exception`.
    The message says what was cleaned up and that there is nothing to resume.
    """

    def __init__(self, signum: int, message: str):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} {message}")
