"""A resume may change when and how much masks move, never what the saved masks mean; compact
optimizer state loads at the world size it was saved at, or is refused by name."""

import logging

import pytest
import torch
from helpers import make, task, train_step

from rigl_ds.checkpoint import saved_mask
from rigl_ds.config import MASK_DEFINING_KEYS, RigLConfigError

BLOCK = {"method": "rigl", "sparsity": 0.8, "delta_t": 3, "end_step": 30}


def _saved_state():
    model, opt, sparse = make(BLOCK, total_steps=40)
    x, y = task()
    for _ in range(5):
        train_step(model, opt, sparse, x, y)
    return sparse.state_dict()


@pytest.mark.parametrize(
    "change",
    [{"sparsity": 0.9}, {"distribution": "uniform"}, {"method": "set"}, {"modules": ["fc1"]}, {"erk_power_scale": 0.5}],
)
def test_resuming_with_a_block_that_changes_what_the_masks_mean_is_refused_naming_the_key(change):
    state = _saved_state()
    _, _, fresh = make({**BLOCK, **change}, total_steps=40)
    key = next(iter(change))
    with pytest.raises(RigLConfigError, match=f"rigl.{key}: saved"):
        fresh.load_state_dict(state)
    assert key in MASK_DEFINING_KEYS


def test_resuming_with_a_new_schedule_is_allowed_and_logged(caplog):
    state = _saved_state()
    _, _, fresh = make({**BLOCK, "delta_t": 5, "end_step": 35}, total_steps=40)
    with caplog.at_level(logging.WARNING, logger="rigl_ds"):
        fresh.load_state_dict(state)
    assert fresh.controller.step == 5 and fresh.controller.end_step == 35
    logged = caplog.text
    assert "rigl.delta_t changed from 3 to 5" in logged and "rigl.end_step changed from 30 to 35" in logged
    assert all(torch.equal(saved_mask(state, n), fresh.masks[n].reshape(-1)) for n in state["masks"])


@pytest.mark.slow
def test_compact_state_saved_on_two_ranks_is_refused_on_one_naming_the_key(tmp_path):
    from gloo import run_gloo

    folder = str(tmp_path / "ckpt")
    run_gloo(
        2, "compact_sim:train_many", [dict(stage=2, dtype="fp32", compact=True, steps=4, save_at=4, save_dir=folder)]
    )
    errors = run_gloo(1, "compact_sim:load_error", dict(stage=2, dtype="fp32", compact=True, load_dir=folder))
    assert "rigl.compact_optimizer_state" in errors[0] and "world size 2" in errors[0] and "this run: 1" in errors[0]
