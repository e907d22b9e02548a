"""Shipped benchmark configs (configs/*.yaml inside the package), found by name or by path."""
from __future__ import annotations

from pathlib import Path

from .config import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"


def list_benchmarks() -> dict[str, str]:
    """Name -> one-line description of every shipped config."""
    out = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        out[path.stem] = first.lstrip("# ").strip()
    return out


def config_path(name_or_path: str) -> Path:
    """A config file: an existing path, or the name of a shipped benchmark."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a shipped benchmark. "
                      f"Shipped benchmarks: {', '.join(list_benchmarks())}.")

