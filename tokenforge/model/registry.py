"""Architecture name -> model class. A new architecture is one new module that calls `register`."""

import importlib

from torch import nn

from tokenforge.errors import ModelFileError

_MODEL_MODULES = ("tokenforge.model.llama",)
_REGISTRY: dict[str, type[nn.Module]] = {}


def register(*names: str):
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        for name in names:
            _REGISTRY[name] = cls
        return cls

    return wrap


def get_model_class(architecture: str) -> type[nn.Module]:
    for module in _MODEL_MODULES:
        importlib.import_module(module)
    try:
        return _REGISTRY[architecture]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ModelFileError(f"unsupported architecture {architecture!r} (supported: {known})") from None
