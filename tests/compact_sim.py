"""DeepSpeed runs with and without compact optimizer state on gloo ranks, returning what each rank
holds: every parameter's whole fp32 master (through DeepSpeed's own API), masks, counts and the
bytes of the torch optimizer's state on this rank."""

from __future__ import annotations

from typing import Any, Dict

import torch
from ds_sim import batch, ds_config, full_masks, tiny_model

from rigl_ds.compact import LAYOUT_KEYS

# Updates at optimizer steps 0, 2, 4, 6, 8, 10: six mask updates in twelve steps.
RIGL = {"method": "rigl", "sparsity": 0.8, "delta_t": 2, "begin_step": 0, "end_step": 10, "seed": 3}


def train(
    stage: int,
    dtype: str,
    compact: bool,
    steps: int = 12,
    rigl: Dict[str, Any] = None,
    pass_compact: bool = False,
    save_at: int = None,
    save_dir: str = None,
    load_dir: str = None,
    master: bool = False,
    sgd: bool = False,
    **extra,
) -> Dict[str, Any]:
    from deepspeed.utils import safe_get_full_fp32_param

    import rigl_ds
    from rigl_ds.compact import CompactAdamW
    from rigl_ds.lm.models import lm_loss

    model = tiny_model("gpt2")
    if sgd:
        extra.setdefault("zero_allow_untested_optimizer", True)  # ZeRO asks for it with torch's SGD too
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    elif pass_compact:
        optimizer = CompactAdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    block = {**(rigl or RIGL), "compact_optimizer_state": compact}
    if master:
        block["compact_master_weights"] = True
    engine, _, _, _ = rigl_ds.initialize(
        model=model, optimizer=optimizer, config=ds_config(stage, dtype, block, **extra)
    )
    sparse = engine.rigl
    start = 0
    if load_dir is not None:
        engine.load_checkpoint(load_dir)
        start = engine.global_steps
    losses = []
    for step in range(start, steps):
        loss = lm_loss(engine, batch("gpt2", step))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        if save_at is not None and step + 1 == save_at:
            engine.save_checkpoint(save_dir)
    basic = engine.basic_optimizer
    weights = {n: safe_get_full_fp32_param(p).detach().clone().reshape(-1) for n, p in engine.module.named_parameters()}
    if master:  # DeepSpeed's "fp32" master is bf16 here; the optimizer's own masters are what it steps
        weights = {n: w.float() for n, w in weights.items()}
    state = [s for s in basic.state.values() if s]
    return {
        "optimizer": type(basic).__name__,
        "weights": weights,
        "masks": full_masks(sparse),
        "pool_counts": sparse.controller.active_counts().tolist(),
        "targets": sparse.plan.targets(sparse.config.sparsity).tolist(),
        "history": [(h.step, h.dropped, h.grown, h.regrown, h.n_active) for h in sparse.history],
        "losses": losses,
        "state_bytes": sum(
            v.numel() * v.element_size() for s in state for v in s.values() if isinstance(v, torch.Tensor)
        ),
        "packed": any(k in s for s in state for k in LAYOUT_KEYS),
        "masters": sum(s["master"].numel() for s in state if "master" in s),
        "bf16_flags": engine._config.bfloat16_config.bf16_master_weights_and_grads,
        # ZeRO-3 keeps no master copy of its own: the partition it steps is the bf16 partition.
        "master_is_partition": stage == 3
        and all(
            a.data_ptr() == b.data_ptr()
            for a, b in zip(
                engine.optimizer.fp16_partitioned_groups_flat, engine.optimizer.fp32_partitioned_groups_flat
            )
        ),
        "fp32_numel": sum(p.numel() for g in basic.param_groups for p in g["params"]) if stage != 3 else None,
    }


def train_many(runs) -> list:
    return [train(**kwargs) for kwargs in runs]


def load_error(kwargs: Dict[str, Any]) -> str:
    """The RigLConfigError a run's checkpoint load raises, or "" if it loads."""
    from rigl_ds.config import RigLConfigError

    try:
        train(**kwargs)
    except RigLConfigError as exc:
        return str(exc)
    return ""
