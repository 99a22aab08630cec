"""Typed configuration: one tree per program, loaded from YAML with dotted overrides.

A config class is a :class:`Config` (a strict ``msgspec.Struct``): unknown keys and
wrong types are errors that name the key and say what is expected.

    params = load(WorldParams, "world.yaml", ["camera.rate_hz=5", "seed=3"])

Environment variables are read here and nowhere else (:func:`env`, and :func:`secret_env`
for a variable that a config names to hold a secret).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional, TypeVar

import msgspec
import yaml


class ConfigError(ValueError):
    """A configuration a program cannot run with; the message says what to change."""


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Base of every config tree. Subclass with typed fields and defaults."""


C = TypeVar("C", bound=Config)

#: Every environment variable the project reads, with its meaning.
ENV_VARS = {
    "ROBIX_DOMAIN": "bus domain: nodes only see nodes of the same domain (default 'default')",
    "ROBIX_GRAPH_DIR": "directory where nodes register their endpoints (default $XDG_RUNTIME_DIR/robix or /tmp/robix-<uid>)",
    "ROBIX_LOG_LEVEL": "log level for the CLI (DEBUG, INFO, WARNING; default INFO)",
    "XDG_RUNTIME_DIR": "per-user runtime directory, the default parent of the graph directory",
}


def env(name: str, default: Optional[str] = None) -> Optional[str]:
    """Read one of :data:`ENV_VARS`. The only place the project reads the environment."""
    if name not in ENV_VARS:
        raise KeyError(f"{name} is not a documented environment variable; add it to config.ENV_VARS")
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def secret_env(name: str) -> Optional[str]:
    """Read a secret (an API key) from the environment variable a config names, e.g. ``model.api_key_env``.

    The one exception to :data:`ENV_VARS`: the variable's name comes from the user's config,
    so the secret itself never sits in a config or launch file. Never log the value.
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name or ""):
        raise ConfigError(f"{name!r} is not a valid environment variable name")
    return os.environ.get(name) or None


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading floats as YAML 1.2 does: ``2e-4`` is a number, not a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """YAML text -> Python data (safe: plain types only; ``1e-3`` is a float)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], parsed YAML scalar or list)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply dotted overrides to a plain dict tree (in place) and return it."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def convert(cls: type[C], data: dict, *, source: str = "config") -> C:
    """Validate a plain dict into ``cls``; errors name the offending key."""
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        fields = ", ".join(f.name for f in msgspec.structs.fields(cls))
        raise ConfigError(f"{source}: {exc}. Valid keys of {cls.__name__}: {fields}") from None


def load(
    cls: type[C],
    path: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    data: Optional[dict] = None,
) -> C:
    """Build ``cls`` from an optional YAML file, an optional dict, then dotted overrides."""
    tree: dict = {}
    if path is not None:
        tree.update(read_yaml(path))
    if data:
        tree.update(data)
    apply_overrides(tree, overrides)
    return convert(cls, tree, source=str(path) if path else "config")


def to_dict(cfg: Config) -> dict:
    """A config as plain data (for logs, launch files and YAML dumps)."""
    return msgspec.to_builtins(cfg)
