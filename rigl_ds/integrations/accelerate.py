"""rigl_ds for ``accelerate`` users: one call after ``accelerator.prepare`` makes the prepared
DeepSpeed engine train sparse.

The user's loop does not change. ``accelerator.backward(loss)`` runs DeepSpeed's
``engine.backward`` and, on gradient-accumulation boundaries only, ``engine.step()`` (accelerate's
``DeepSpeedEngineWrapper``); ``optimizer.step()`` and ``optimizer.zero_grad()`` are no-ops under
DeepSpeed. rigl_ds hooks the engine's optimizer step, so masks are applied and updated once per optimizer step,
however many micro-batches are accumulated (use ``with accelerator.accumulate(model):`` as usual).

On CPU-only ranks, make ``accelerate.PartialState(cpu=True)`` before the ``Accelerator``: it finds
the launcher's gloo world, and the ``Accelerator`` made with a ``DeepSpeedPlugin`` after it still runs
DeepSpeed. Without it DeepSpeed trains over the whole world but accelerate counts one process
(``accelerator.num_processes == 1``: dataloaders are not sharded, and an ``"auto"`` batch size is
filled in for one process, which DeepSpeed then rejects).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ..adapter import plan_for_model
from ..config import ConfigLike, load_config
from .deepspeed import SparseEngine


def sparsify(accelerator: Any, total_steps: Optional[int] = None, config: ConfigLike = None) -> SparseEngine:
    """Attaches rigl_ds to the engine of ``accelerator.prepare(model, optimizer, ...)`` and returns
    its ``SparseEngine`` (also ``engine.rigl``).

    ``config`` defaults to the ``"rigl"`` block of the DeepSpeed config the engine was built with;
    it is validated here, and an error names the bad key. ``total_steps`` (optimizer steps, not
    micro-batches) is needed only when the block ends updates by ``end_fraction``. Calling it again
    on the same engine returns the ``SparseEngine`` already attached."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is None:
        raise RuntimeError(
            "rigl_ds.integrations.accelerate.sparsify: no DeepSpeed engine; call it after "
            "accelerator.prepare(model, optimizer, ...) on an Accelerator with a DeepSpeedPlugin"
        )
    if config is None:
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        config = rigl_block(plugin.deepspeed_config if plugin is not None else wrapped.engine.config)
    return attach(wrapped.engine, config, total_steps)


def attach(engine: Any, config: ConfigLike, total_steps: Optional[int]) -> SparseEngine:
    """``SparseEngine(engine, ...)`` after validating ``config`` (the ``"rigl"`` block, or a whole
    DeepSpeed config holding one) against the engine's model; idempotent per engine."""
    existing = getattr(engine, "rigl", None)
    if existing is not None:
        # Attached when deepspeed.initialize ran (the autohook); it may still wait for its step count.
        if total_steps is not None:
            existing.controller.set_total_steps(total_steps)
        return existing
    if getattr(engine, "optimizer", None) is None:
        raise RuntimeError("rigl_ds: the DeepSpeed engine has no optimizer (prepared for inference only)")
    rigl_config = load_config(config)
    plan_for_model(engine.module, rigl_config)  # module patterns that match nothing fail here, by name
    return SparseEngine(engine, rigl_config, total_steps)


def rigl_block(ds_config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``"rigl"`` block of a DeepSpeed config, as ``load_config`` takes it; an error if there is none."""
    block = ds_config.get("rigl") if isinstance(ds_config, Mapping) else None
    if block is None:
        raise ValueError('rigl_ds: the DeepSpeed config has no "rigl" block; add one, or pass config=')
    return {"rigl": block}  # load_config then says "rigl: must be a JSON object" for a non-dict block
