"""Every test stands for a command typed in a terminal: where the suite itself was started with stop signals
ignored (under nohup, SIGHUP; in the background of a non-interactive shell, SIGINT), and every child would
inherit that, each test gets the terminal's actions (Python's KeyboardInterrupt for SIGINT, the default for
SIGHUP) and the ignored ones are put back after it."""
from __future__ import annotations

import signal

import pytest

TERMINAL = {signal.SIGINT: signal.default_int_handler, signal.SIGHUP: signal.SIG_DFL}


@pytest.fixture(autouse=True)
def stop_signals_as_in_a_terminal():
    ignored = [s for s in TERMINAL if signal.getsignal(s) == signal.SIG_IGN]
    for s in ignored:
        signal.signal(s, TERMINAL[s])
    yield
    for s in ignored:
        signal.signal(s, signal.SIG_IGN)
