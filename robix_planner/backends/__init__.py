"""Model backends behind one interface (:class:`~robix_planner.backends.base.Backend`).

Backends are imported only when chosen, so the planner pulls in torch only for ``hf``
and nothing heavy for ``openai`` or ``scripted``.
"""

from __future__ import annotations

import importlib

from robix_planner.backends.base import Backend, BackendError, ModelConfig
from robix_planner.config import ConfigError

#: Built-in backends, by the name used in ``model.backend``.
BUILTIN = {
    "hf": "robix_planner.backends.hf:HFBackend",
    "openai": "robix_planner.backends.openai_compat:OpenAIBackend",
    "scripted": "robix_planner.backends.scripted:ScriptedBackend",
}


def load_backend(config: ModelConfig) -> Backend:
    """Construct the backend ``config.backend`` names (a built-in name or ``module:Class``)."""
    target = BUILTIN.get(config.backend, config.backend)
    if ":" not in target:
        raise ConfigError(
            f"model.backend={config.backend!r} is unknown; use one of {sorted(BUILTIN)} or package.module:Class"
        )
    mod_name, _, cls_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise ConfigError(f"model.backend={config.backend!r}: cannot load {target} ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(f"model.backend={config.backend!r}: {target} is not a Backend subclass")
    return cls(config)


__all__ = ["Backend", "BackendError", "ModelConfig", "load_backend", "BUILTIN"]
