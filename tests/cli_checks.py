"""Checks shared by the tests of mistakes and faults: one clean error line, and files left as they were."""
from __future__ import annotations

import os
from pathlib import Path

from clipcl.cli import main


def fail(argv, capsys, code=2) -> str:
    """Run the CLI expecting failure with `code`; returns the one 'clipcl: error:' line (no traceback)."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("clipcl: error:")]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (links as their target name), for byte-for-byte comparisons."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = b"->" + os.readlink(p).encode()
        elif p.is_file():
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out
