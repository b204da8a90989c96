"""Adapters to training frameworks; each imports its framework only when used."""

_LAZY = {"RigLCallback": "hf", "sparsify_trainer": "hf"}


def __getattr__(name: str):
    # ``from rigl_ds.integrations import RigLCallback`` imports transformers only then.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
