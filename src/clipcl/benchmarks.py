"""Shipped benchmark configs (configs/*.yaml inside the package), found by name or by path."""
from __future__ import annotations

from pathlib import Path

from .config import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"


def titles(folder: Path) -> dict[str, str]:
    """Name -> the first comment line of every YAML file shipped in folder."""
    out = {}
    for path in sorted(folder.glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        out[path.stem] = first[0].lstrip("# ").strip() if first else ""
    return out


def shipped_or_path(name_or_path: str, folder: Path, what: str, kind: str, hint: str = "") -> Path:
    """An existing file, or the YAML file shipped in folder under that name (else a ConfigError listing them)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = folder / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"{what} '{name_or_path}' is neither a file nor a shipped {kind}. Shipped {kind}s: "
                      f"{', '.join(titles(folder))}{hint}.")


def list_benchmarks() -> dict[str, str]:
    """Name -> one-line description of every shipped config."""
    return titles(CONFIG_DIR)


def config_path(name_or_path: str) -> Path:
    """A config file: an existing path, or the name of a shipped benchmark."""
    return shipped_or_path(name_or_path, CONFIG_DIR, "config", "benchmark")
