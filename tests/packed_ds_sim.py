"""DeepSpeed runs with ``"storage": "packed"`` and the same run with ``"masked"``, on gloo ranks:
what each holds after every step, as dense tensors, so a test can compare them entry for entry."""

from __future__ import annotations

from typing import Any, Dict

import ds_sim
import torch


def _dense_masked(engine, stage: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """Masked storage: each masked weight's fp32 master and Adam moments, whole (DeepSpeed's API)."""
    names = [s.layer.name for s in engine.rigl.shards]
    return {n: {k: v.clone() for k, v in c.items() if k != "low_precision"} for n, c in ds_sim.full_copies(
        engine, stage, names).items()}


def _dense_packed(engine) -> Dict[str, Dict[str, torch.Tensor]]:
    """Packed storage: the same, scattered from the values' fp32 master and per-slot Adam moments."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    stepped = any(engine.basic_optimizer.state.values())
    import deepspeed

    for s in engine.rigl.shards:
        with deepspeed.zero.GatheredParameters([s.scatter.positions]):  # a no-op below ZeRO-3
            pos = s.scatter.positions.detach().long().clone()
        has_master = hasattr(s.values, "_hp_mapping") or hasattr(s.values, "ds_id")
        entry = {"fp32": safe_get_full_fp32_param(s.values) if has_master else s.values.detach()}
        if not has_master:  # stage 0, a torch optimizer stepping the values themselves
            for key, v in engine.basic_optimizer.state.get(s.values, {}).items():
                if isinstance(v, torch.Tensor) and v.shape == s.values.shape:
                    entry[key] = v
        elif stepped:
            for key in ("exp_avg", "exp_avg_sq"):
                entry[key] = safe_get_full_optimizer_state(s.values, key)
        out[s.layer.name] = {
            k: torch.zeros(s.layer.numel, dtype=torch.float32).index_put_((pos,), v.detach().float().cpu().reshape(-1))
            for k, v in entry.items()
        }
    return out


def train(
    stage: int,
    dtype: str,
    storage: str,
    rigl: Dict[str, Any],
    steps: int = 8,
    zero_init: bool = False,
    family: str = "gpt2",
    **extra,
) -> Dict[str, Any]:
    """``zero_init``: the model built under ``deepspeed.zero.Init`` (ZeRO-3), as the bundled trainer
    does; ``family``: "gpt2" (Conv1D) or "lstm" (a word LSTM's gate matrices)."""
    import rigl_ds
    from rigl_ds.lm.models import build_model, lm_loss

    config = ds_sim.ds_config(stage, dtype, {**rigl, "storage": storage}, **{"gradient_clipping": 0.0, **extra})
    if zero_init:
        torch.manual_seed(0)
        sizes = dict(n_layer=2, n_embd=32, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = build_model("gpt2", 64, config, **sizes)
    else:
        model = ds_sim.tiny_model(family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    engine, _, _, _ = rigl_ds.initialize(model=model, optimizer=optimizer, config=config)
    sparse = engine.rigl
    losses, masks, states, held = [], [], [], []
    for step in range(steps):
        loss = lm_loss(engine, ds_sim.batch(family, step))
        engine.backward(loss)
        c = sparse.controller
        ends_step = engine.is_gradient_accumulation_boundary()
        if storage == "packed" and ends_step and c.method.is_update_step(c.step, c.last_update):
            # After the step's backward, before the update: which layers still hold a dense gradient,
            # and which were selected inside backward.
            held.append(
                (
                    [s.layer.name for s in sparse.shards if s._dense_grad is not None],
                    [s.layer.name for s in sparse.shards if s.take_selection() is not None],
                )
            )
        engine.step()
        losses.append(float(loss.detach()))
        masks.append(ds_sim.full_masks(sparse))
        states.append(_dense_packed(engine) if storage == "packed" else _dense_masked(engine, stage))
    return {
        "layout": sparse.layout,
        "losses": losses,
        "masks": masks,
        "states": states,
        "history": [(h.step, h.dropped, h.grown, h.regrown, h.n_active) for h in sparse.history],
        "held": held,
        "layers": [s.layer.name for s in sparse.shards],
        "params": sorted(n for n, _ in engine.module.named_parameters()),
    }


def pairs(runs) -> list:
    """For each run: the masked and the packed result, in one set of ranks."""
    out = []
    for run in runs:
        out.append({storage: train(storage=storage, **run) for storage in ("masked", "packed")})
    return out


def resume(
    stage: int, dtype: str, rigl: Dict[str, Any], folder: str, steps: int = 8, save_at: int = 4
) -> Dict[str, Any]:
    """A packed run saved at ``save_at`` and continued, and a fresh engine (other initial weights and
    masks) that loads that checkpoint and runs the same steps: both runs' losses and masks."""
    import rigl_ds
    from rigl_ds.lm.models import lm_loss

    def run(seed: int, load: bool) -> Dict[str, Any]:
        torch.manual_seed(seed)
        model = ds_sim.tiny_model("gpt2", seed=seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        block = {**rigl, "storage": "packed", "seed": rigl.get("seed", 0) + seed}
        config = ds_sim.ds_config(stage, dtype, block, gradient_clipping=0.0)
        engine, _, _, _ = rigl_ds.initialize(model=model, optimizer=optimizer, config=config)
        start = 0
        if load:
            engine.load_checkpoint(folder)
            start = engine.global_steps
        losses, masks = [], []
        for step in range(start, steps):
            loss = lm_loss(engine, ds_sim.batch("gpt2", step))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            masks.append(ds_sim.full_masks(engine.rigl))
            if not load and step + 1 == save_at:
                engine.save_checkpoint(folder)
        return {"start": start, "losses": losses, "masks": masks}

    straight = run(0, load=False)
    resumed = run(5, load=True)
    return {"straight": straight, "resumed": resumed}


def save_both(stage: int, dtype: str, rigl: Dict[str, Any], folders: Dict[str, str], steps: int = 5) -> None:
    """The masked and the packed run, each saved after ``steps`` steps into ``folders[storage]``."""
    import rigl_ds
    from rigl_ds.lm.models import lm_loss

    for storage, folder in folders.items():
        model = ds_sim.tiny_model("gpt2")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        config = ds_sim.ds_config(stage, dtype, {**rigl, "storage": storage}, gradient_clipping=0.0)
        engine, _, _, _ = rigl_ds.initialize(model=model, optimizer=optimizer, config=config)
        for step in range(steps):
            engine.backward(lm_loss(engine, ds_sim.batch("gpt2", step)))
            engine.step()
        engine.save_checkpoint(folder)
