"""Architecture name -> (config class, model class). A new architecture registers itself with
`@register("name", ConfigClass)` on its model class and is then picked up everywhere: the
conformance tests, the trainer, the generator, the CLI."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dynlm.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from dynlm.config import ModelConfig
    from dynlm.models.base import DynModel

_REGISTRY: dict[str, tuple[type[ModelConfig], type[DynModel]]] = {}

# Modules that register architectures when imported; imported lazily so `import dynlm` stays fast.
_ARCHITECTURE_MODULES = ["dynlm.models.standard", "dynlm.models.mod", "dynlm.models.dtf", "dynlm.models.thl",
                         "dynlm.models.agiformer"]


def register(name: str, config_class: type[ModelConfig]):
    def decorator(model_class: type[DynModel]) -> type[DynModel]:
        model_class.config_class = config_class
        model_class.architecture = name
        _REGISTRY[name] = (config_class, model_class)
        return model_class

    return decorator


def _load_all() -> None:
    for module in _ARCHITECTURE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:  # an architecture not written yet is simply absent
            if e.name != module:
                raise


def list_architectures() -> list[str]:
    """Names of every registered architecture."""
    _load_all()
    return sorted(_REGISTRY)


def get_architecture(name: str) -> tuple[type[ModelConfig], type[DynModel]]:
    _load_all()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model type '{name}'", did_you_mean(name, _REGISTRY))
    return _REGISTRY[name]
