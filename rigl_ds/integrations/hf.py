"""rigl_ds for ``transformers.Trainer`` run with ``TrainingArguments(deepspeed=...)``.

The ``"rigl"`` block goes in the DeepSpeed config; the model and the Trainer are the user's own::

    trainer = Trainer(model=model, args=TrainingArguments(..., deepspeed="ds.json"), ...)
    rigl_ds.integrations.hf.sparsify_trainer(trainer)
    trainer.train()  # or trainer.train(resume_from_checkpoint=...)

Callbacks are not handed the DeepSpeed engine, and the Trainer loads a checkpoint it resumes from
into the engine before ``on_train_begin``. So the callback, built with the trainer, hooks the
trainer's ``accelerator.prepare``: the engine gets its ``SparseEngine`` (``engine.rigl``) the moment
``deepspeed.initialize`` has built it, before any checkpoint is loaded, just as
``rigl_ds.initialize`` does. DeepSpeed checkpoints the Trainer saves then carry the masks and
method state (``<checkpoint>/global_stepN/rigl_ds/``) and the Trainer's own resume restores them.
Under accelerate, ``engine.step()`` runs once per optimizer step (at the accumulation boundary), so
rigl_ds's steps are the Trainer's ``global_step``.

On CPU-only ranks pass ``TrainingArguments(use_cpu=True)`` as well: without it accelerate finds no
device and a world of one process (DeepSpeed then rejects the batch size); with it the Trainer still
runs DeepSpeed, over the gloo world of the launcher.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from transformers import TrainerCallback

from ..adapter import plan_for_model
from ..config import RigLConfig, load_config
from .accelerate import attach, rigl_block
from .autopatch import adapter_building
from .deepspeed import SparseEngine


class RigLCallback(TrainerCallback):
    """Sparse training for one ``Trainer`` whose DeepSpeed config has a ``"rigl"`` block.

    Construction validates the block (an error names the key) and its module patterns against
    ``trainer.model``. Updates end by ``end_fraction`` of the trainer state's ``max_steps`` unless the
    block sets ``end_step``. Each log gets ``rigl/drop_fraction`` (of the latest update),
    ``rigl/n_active``, ``rigl/sparsity`` (over the masked layers) and ``rigl/updates``."""

    def __init__(self, trainer: Any):
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        if plugin is None:
            raise ValueError("RigLCallback needs a Trainer running DeepSpeed: TrainingArguments(deepspeed=<config>)")
        self.trainer = trainer
        self.config: RigLConfig = load_config(rigl_block(plugin.deepspeed_config))
        plan_for_model(trainer.model, self.config)
        self.sparse: Optional[SparseEngine] = None
        self._hook_prepare(trainer.accelerator)

    def _hook_prepare(self, accelerator: Any) -> None:
        """Wraps this accelerator's ``prepare`` (on the instance; idempotent)."""
        prepare = accelerator.prepare
        if getattr(prepare, "_rigl_ds_callback", None) is self:
            return

        def prepare_then_sparsify(*args: Any, **kwargs: Any):
            # deepspeed.initialize, run inside prepare, attaches rigl_ds already when the autohook is on
            # (with the Trainer's step count); _attach below then finds it attached.
            with adapter_building(self.trainer.state.max_steps or None):
                out = prepare(*args, **kwargs)
            self._attach(out if isinstance(out, tuple) else (out,))
            return out

        prepare_then_sparsify._rigl_ds_callback = self
        accelerator.prepare = prepare_then_sparsify

    def _attach(self, prepared) -> None:
        from deepspeed import DeepSpeedEngine

        for obj in prepared:
            # An engine prepared without an optimizer (evaluation, ZeRO inference) stays dense.
            if isinstance(obj, DeepSpeedEngine) and obj.optimizer is not None:
                # Trainer computes max_steps (state.max_steps) before it prepares the model.
                self.sparse = attach(obj, self.config, self.trainer.state.max_steps or None)

    # -- Trainer events ------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        engine = self.trainer.model_wrapped
        if getattr(engine, "rigl", None) is None:
            # The Trainer replaced its accelerator after construction (hyperparameter search does),
            # so prepare ran unhooked. Nothing has touched the weights since deepspeed.initialize,
            # so attaching now is the same as attaching then -- unless a checkpoint was loaded.
            if state.global_step > 0:
                raise RuntimeError(
                    "rigl_ds: the DeepSpeed engine was built and loaded from a checkpoint without rigl_ds, so "
                    "the checkpoint's masks were not restored; call sparsify_trainer(trainer) right before "
                    "trainer.train(resume_from_checkpoint=...)"
                )
            self._attach((engine,))
        elif engine.rigl.controller.end_step_pending and state.max_steps:
            # Attached by the autohook inside a prepare this callback did not wrap: give it the step count.
            engine.rigl.controller.set_total_steps(state.max_steps)
        self._hook_prepare(self.trainer.accelerator)  # for later train() calls on a new accelerator
        self.sparse = engine.rigl
        step = self.sparse.controller.step
        if step != state.global_step:
            raise RuntimeError(
                f"rigl_ds state is at optimizer step {step} but the Trainer starts at step {state.global_step}: "
                "the checkpoint's rigl_ds state does not belong to it"
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.sparse is None or logs is None:
            return
        metrics = self.metrics()
        logs.update(metrics)
        # Trainer.log appends its copy of `logs` to log_history before the callbacks run.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def metrics(self) -> Dict[str, float]:
        """The controller's resume-safe ``rigl/*`` counters (no collective: ranks log independently)."""
        return self.sparse.controller.metrics()


def sparsify_trainer(trainer: Any) -> RigLCallback:
    """Adds a ``RigLCallback`` to ``trainer`` (first in line, so reporting callbacks see its log
    entries) and returns it; call before ``trainer.train()``. Idempotent: a Trainer that already has
    one (the autohook adds it to Trainers whose DeepSpeed config has a ``"rigl"`` block) keeps it."""
    for existing in trainer.callback_handler.callbacks:
        if isinstance(existing, RigLCallback):
            return existing
    callback = RigLCallback(trainer)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
