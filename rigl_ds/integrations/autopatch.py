"""What ``rigl_ds_autohook`` does to DeepSpeed and transformers once they are imported.

- ``deepspeed.initialize``: a config with a ``"rigl"`` block goes through ``rigl_ds.initialize``
  (``sparse`` mode), or builds DeepSpeed's engine with a guard that stops it at its first step unless
  rigl_ds was attached explicitly (``guard`` mode). Without a block: DeepSpeed's own, untouched.
- ``transformers.Trainer.__init__`` (``sparse`` mode): a Trainer whose DeepSpeed config has a
  ``"rigl"`` block gets ``sparsify_trainer``, so it logs ``rigl/*`` entries, learns its step count
  from the Trainer and resumes masks with the Trainer's checkpoints.

The number of training steps (needed when ``end_fraction`` ends updates) comes from, in order:
``total_steps=`` given to ``rigl_ds.initialize``; the Trainer's ``max_steps``; the DeepSpeed
``"scheduler"`` block's ``total_num_steps`` (accelerate fills it from its ``DummyScheduler``, the HF
Trainer from its ``"auto"``); the ``total_num_steps`` or ``total_steps`` of the scheduler object
handed to ``deepspeed.initialize``; a later ``rigl_ds.integrations.accelerate.sparsify(...,
total_steps=)``. With none of these the first optimizer step stops with an error naming
``rigl.end_step``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Dict, Iterator, Optional

ENABLE_HINT = (
    "run the script through rigl_ds (`deepspeed [launcher args] --module rigl_ds.run SCRIPT ARGS`, "
    "`python -m rigl_ds.run SCRIPT ARGS`), unset RIGL_DS_AUTOHOOK=0, or call rigl_ds.initialize / "
    "rigl_ds.integrations.hf.sparsify_trainer / rigl_ds.integrations.accelerate.sparsify in the script"
)

# Set while a rigl_ds adapter (the Trainer callback) builds its engine: the step count it knows.
_adapter_total_steps: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar(
    "rigl_ds_adapter_total_steps", default=None
)
_adapter_active: contextvars.ContextVar[bool] = contextvars.ContextVar("rigl_ds_adapter_active", default=False)


@contextlib.contextmanager
def adapter_building(total_steps: Optional[int]) -> Iterator[None]:
    """An adapter that will attach rigl_ds to the engine built inside this block (and knows the
    number of steps, or None) says so here: ``deepspeed.initialize`` then trains sparse in any mode."""
    tokens = (_adapter_active.set(True), _adapter_total_steps.set(total_steps))
    try:
        yield
    finally:
        _adapter_active.reset(tokens[0])
        _adapter_total_steps.reset(tokens[1])


def patch(name: str, module: Any) -> None:
    if name == "deepspeed":
        _patch_deepspeed(module)
    elif name == "transformers.trainer":
        _patch_trainer(module)


def original_initialize():
    """DeepSpeed's own ``initialize``, whether or not it was patched."""
    import deepspeed

    return getattr(deepspeed.initialize, "_rigl_ds_original", deepspeed.initialize)


def _mode() -> str:
    try:
        import rigl_ds_autohook
    except ImportError:  # rigl_ds used from a source tree without the hook module: explicit API only
        return "sparse"
    return rigl_ds_autohook.mode()


# -- deepspeed.initialize -------------------------------------------------------------------------
def _patch_deepspeed(deepspeed: Any) -> None:
    current = deepspeed.initialize
    if getattr(current, "_rigl_ds_original", None) is not None:
        return
    original = current

    @functools.wraps(original)
    def initialize(*args: Any, **kwargs: Any):
        from .deepspeed import _ds_config_dict

        try:
            config = _ds_config_dict(
                kwargs.get("config", kwargs.get("config_params")), kwargs.get("args", args[0] if args else None)
            )
        except Exception:  # a config DeepSpeed itself will judge (and explain)
            config = None
        if not isinstance(config, dict) or "rigl" not in config:
            return original(*args, **kwargs)
        if _mode() == "sparse" or _adapter_active.get():
            from .deepspeed import initialize as rigl_initialize

            return rigl_initialize(*args, total_steps=_adapter_total_steps.get(), defer_total_steps=True, **kwargs)
        out = original(*args, **kwargs)
        _guard(out[0])
        return out

    initialize._rigl_ds_original = original
    deepspeed.initialize = initialize


def _guard(engine: Any) -> None:
    """``guard`` mode: the engine may not take a step until rigl_ds is attached to it."""

    def check() -> None:
        if getattr(engine, "rigl", None) is None and getattr(engine, "optimizer", None) is not None:
            from ..config import RigLConfigError

            raise RigLConfigError(
                'rigl_ds: the DeepSpeed config has a "rigl" block but this engine would train dense '
                f"(RIGL_DS_AUTOHOOK=0 and rigl_ds was not attached to it); {ENABLE_HINT}"
            )

    for name in ("step", "train_batch"):
        method = getattr(engine, name, None)
        if method is None:
            continue

        def guarded(*args: Any, _method=method, **kwargs: Any):
            check()
            return _method(*args, **kwargs)

        setattr(engine, name, guarded)


def total_steps_from(config: Dict[str, Any], lr_scheduler: Any = None) -> Optional[int]:
    """Optimizer steps as a DeepSpeed config or the scheduler handed to ``deepspeed.initialize``
    states them, or None."""
    params = (config.get("scheduler") or {}).get("params") or {}
    candidates = [params.get("total_num_steps")]
    candidates += [getattr(lr_scheduler, key, None) for key in ("total_num_steps", "total_steps")]
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# -- transformers.Trainer -------------------------------------------------------------------------
def _patch_trainer(trainer_module: Any) -> None:
    cls = getattr(trainer_module, "Trainer", None)
    if cls is None or getattr(cls.__init__, "_rigl_ds_patched", False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if _mode() != "sparse" or _trainer_rigl_block(self) is None:
            return
        from .hf import sparsify_trainer

        sparsify_trainer(self)

    __init__._rigl_ds_patched = True
    cls.__init__ = __init__


def _trainer_rigl_block(trainer: Any) -> Optional[Any]:
    accelerator = getattr(trainer, "accelerator", None)
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    config = getattr(plugin, "deepspeed_config", None)
    return config.get("rigl") if isinstance(config, dict) else None
