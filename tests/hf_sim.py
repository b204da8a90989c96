"""Short ``transformers.Trainer`` and ``accelerate`` runs with DeepSpeed and a "rigl" block on gloo
ranks (started by tests/gloo.py), returning what each rank holds."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional

import torch
from ds_sim import full_copies, full_masks, tiny_model

RIGL = {"method": "rigl", "sparsity": 0.8, "delta_t": 2, "begin_step": 0, "end_fraction": 0.75, "seed": 3}


def hf_ds_config(stage: int, rigl: Optional[Dict[str, Any]] = None, **extra: Any) -> Dict[str, Any]:
    """A DeepSpeed config as Trainer users write it: "auto" where the Trainer fills in its args, no
    optimizer (the Trainer's torch AdamW; a DS optimizer would JIT-build FusedAdam)."""
    cfg = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "rigl": dict(RIGL if rigl is None else rigl),
    }
    cfg.update(extra)
    return cfg


def token_dataset(n: int = 64, seq: int = 16, vocab: int = 64) -> List[Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def _launcher_env() -> None:
    """What torchrun would also have set; accelerate's CPU state reads it (the process group
    itself is already up, so nothing connects to MASTER_ADDR). And, as test_multinode does, one
    torch extension cache per virtualenv: DeepSpeed JIT-builds its shm comm op there when it first
    sets up its comm backend, and venvs sharing the default cache rebuild it in turn (minutes)."""
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")


def _summary(engine, stage: int) -> Dict[str, Any]:
    sparse = engine.rigl
    names = [sh.layer.name for sh in sparse.shards]
    masks = full_masks(sparse)
    copies = full_copies(engine, stage, names)
    return {
        "layout": sparse.layout,
        "local_mask_entries": sum(sh.mask.numel() for sh in sparse.shards),
        "masked_entries": sum(sh.layer.numel for sh in sparse.shards),
        "end_step": sparse.controller.end_step,
        "report": sparse.layer_report(),
        "targets": sparse.plan.targets(sparse.config.sparsity).tolist(),
        "pool_counts": sparse.controller.active_counts().tolist(),
        "history": [(h.step, h.dropped, h.grown, h.regrown, h.n_active) for h in sparse.history],
        "controller_step": sparse.controller.step,
        "engine_steps": engine.global_steps,
        "masks": masks,
        "violations": {(n, k): int((t[~masks[n]] != 0).sum()) for n in names for k, t in copies[n].items()},
        "weights": {n: c["fp32"] for n, c in copies.items()},
    }


def trainer_run(
    stage: int,
    output_dir: str,
    max_steps: int = 8,
    save_steps: Optional[int] = None,
    resume: Optional[str] = None,
    rigl: Optional[Dict[str, Any]] = None,
    grad_accum: int = 1,
    hooked: bool = True,
) -> Dict[str, Any]:
    """Trainer + DeepSpeed + rigl_ds on this rank; the user's model and Trainer, one extra call.
    ``hooked=False`` undoes the callback's hook on ``accelerator.prepare`` (as a Trainer that
    replaces its accelerator would), so the callback attaches at ``on_train_begin`` instead."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from rigl_ds.integrations import RigLCallback, sparsify_trainer  # the lazy export

    _launcher_env()
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=grad_accum,
        learning_rate=1e-2,
        weight_decay=0.01,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        deepspeed=hf_ds_config(stage, rigl),
        # Without it accelerate sees no device and a world of 1 on CPU ranks (DeepSpeed then rejects
        # train_batch_size); with it the Trainer still runs DeepSpeed, over the gloo world.
        use_cpu=True,
    )
    trainer = Trainer(model=tiny_model("gpt2"), args=args, train_dataset=token_dataset())
    callback = sparsify_trainer(trainer)
    if not hooked:
        del trainer.accelerator.prepare  # the instance's wrapper; Accelerator.prepare shows through
    trainer.train(resume_from_checkpoint=resume)
    out = _summary(trainer.model_wrapped, stage)
    out["logs"] = [dict(e) for e in trainer.state.log_history]
    out["same_sparse"] = callback.sparse is trainer.model_wrapped.rigl
    out["is_callback"] = isinstance(callback, RigLCallback) and isinstance(callback, TrainerCallback)
    out["checkpoints"] = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    out["distributed_type"] = str(trainer.accelerator.distributed_type)
    out["num_processes"] = trainer.accelerator.num_processes
    return out


def accelerate_run(
    stage: int,
    grad_accum: int = 2,
    micro_batches: int = 12,
    rigl: Optional[Dict[str, Any]] = None,
    cpu_state: bool = True,
) -> Dict[str, Any]:
    """The accelerate loop users write (accumulate / backward / step / zero_grad), plus one
    ``sparsify`` call after ``prepare``; what the masks were after every micro-batch.
    ``cpu_state=False`` skips the CPU PartialState (DeepSpeed then still trains over both ranks,
    but accelerate counts one process)."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.state import AcceleratorState, PartialState
    from ds_sim import batch

    from rigl_ds.integrations.accelerate import sparsify

    _launcher_env()
    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier run in this process set it up
    # On CPU ranks accelerate finds the gloo world only through a CPU PartialState; the Accelerator
    # made after it still runs DeepSpeed (TrainingArguments(use_cpu=True) does the same).
    if cpu_state:
        PartialState(cpu=True)
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        "rigl": dict(RIGL if rigl is None else rigl),
    }
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg), gradient_accumulation_steps=grad_accum
    )
    model = tiny_model("gpt2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    sparse = sparsify(accelerator, total_steps=micro_batches // grad_accum)
    engine = accelerator.deepspeed_engine_wrapped.engine
    per_micro_batch = []
    for i in range(micro_batches):
        x = batch("gpt2", i)
        with accelerator.accumulate(model):
            loss = model(input_ids=x, labels=x).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        per_micro_batch.append(
            {
                "sync": accelerator.sync_gradients,
                "controller_step": sparse.controller.step,
                "engine_steps": engine.global_steps,
                "updates": len(sparse.history),
                "masks": full_masks(sparse),
            }
        )
    out = _summary(engine, stage)
    out["per_micro_batch"] = per_micro_batch
    out["distributed_type"] = str(accelerator.distributed_type)
    out["num_processes"] = accelerator.num_processes
    out["same_sparse"] = sparse is engine.rigl and sparsify(accelerator) is sparse
    return out


def rejected(bad: Dict[str, Any], output_dir: str) -> Dict[str, str]:
    """The errors a Trainer and an Accelerator with a bad "rigl" value stop with, at start-up."""
    from rigl_ds.config import RigLConfigError

    rigl = {**RIGL, **bad}
    attempts = {
        "trainer": lambda: trainer_run(stage=2, output_dir=output_dir, rigl=rigl),
        "accelerate": lambda: accelerate_run(stage=2, rigl=rigl),
    }
    errors = {}
    for name, attempt in attempts.items():
        try:
            attempt()
        except RigLConfigError as exc:
            errors[name] = str(exc)
    return {"errors": errors}


def many(runs) -> list:
    """Several (target, kwargs) runs one after another in one set of ranks (start-up paid once)."""
    funcs = {"trainer": trainer_run, "accelerate": accelerate_run, "rejected": rejected}
    out = []
    for target, kwargs in runs:
        start = time.perf_counter()
        result = funcs[target](**kwargs)
        result["seconds"] = time.perf_counter() - start
        out.append(result)
    return out
