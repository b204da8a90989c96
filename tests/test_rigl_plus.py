"""RigL-plus options (grow_bias_correction, grow_warmup_steps, constant_fan_in, n_m) and the
exploration metrics: each default is the paper's behaviour, each option does what it says, and the
sharded path refuses what it does not implement yet, by name."""

import pytest
import torch
from helpers import TinyLM, make, task, train_step
from torch import nn

import rigl_ds
from rigl_ds.adapter import plan_for_model
from rigl_ds.config import RigLConfigError, load_config
from rigl_ds.fan_in import coefficient_of_variation, fan_in_counts, output_axes
from rigl_ds.plan import LayerPlan

MASKED = ("fc1.weight", "fc2.weight")
BLOCK = {"method": "rigl", "sparsity": 0.8, "delta_t": 5, "end_step": 40}


def test_plus_keys_default_to_the_paper_behaviour():
    c = load_config({})
    assert (c.grow_bias_correction, c.grow_warmup_steps, c.constant_fan_in, c.n_m) == ("global", 0, False, None)


@pytest.mark.parametrize(
    "block, words",
    [
        ({"grow_bias_correction": "adam"}, ["rigl.grow_bias_correction", "global, per_entry"]),
        ({"grow_warmup_steps": -1}, ["rigl.grow_warmup_steps"]),
        ({"n_m": [4, 2]}, ["rigl.n_m", "1 <= N < M"]),
        ({"n_m": [2, 4], "sparsity": 0.9}, ["n_m [2, 4] fixes sparsity"]),
        ({"constant_fan_in": True, "distribution": "global"}, ["constant_fan_in", "per-layer distribution"]),
        ({"method": "static", "grow_warmup_steps": 10}, ["grow_warmup_steps", "never grows"]),
    ],
)
def test_bad_plus_settings_are_refused_naming_the_key(block, words):
    with pytest.raises(RigLConfigError) as err:
        load_config(block)
    assert all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("constant_fan_in", True),
        ("grow_bias_correction", "per_entry"),
        ("n_m", [1, 4]),
    ],
)
def test_the_sharded_path_refuses_single_process_options_by_name(key, value):
    extra = {"sparsity": 0.75, "distribution": "uniform"} if key == "n_m" else {}
    config = load_config({**BLOCK, **extra, key: value})
    with pytest.raises(RigLConfigError, match=f"rigl.{key}: .*single-process path"):
        plan_for_model(TinyLM(), config)  # what rigl_ds.initialize runs before DeepSpeed builds anything
    plan_for_model(TinyLM(), config, single_process=True)


def test_the_recommended_block_is_allowed_on_the_sharded_path():
    # Keyed draws by global index and the reduced gradient: exact over shards (tests/test_sharded_gloo.py).
    config = load_config({**BLOCK, "grow_candidate_fraction": 0.1, "skip_optimizer_step_on_update": False})
    plan_for_model(TinyLM(), config)


def _fan_ins(sparse, name):
    return sparse.masks[name].sum(dim=1)  # Linear: (out, in), one row per output unit


def test_constant_fan_in_keeps_every_output_units_fan_in_equal_through_updates():
    model, opt, sparse = make({**BLOCK, "constant_fan_in": True})
    x, y = task()
    start = {n: _fan_ins(sparse, n) for n in MASKED}
    first = {n: m.clone() for n, m in sparse.masks.items()}
    for _ in range(41):
        train_step(model, opt, sparse, x, y)
    moved = sum(int((first[n] != sparse.masks[n]).sum()) for n in MASKED)
    assert moved > 0
    for n in MASKED:
        fan_in = _fan_ins(sparse, n)
        assert torch.equal(fan_in, start[n]) and int(fan_in.min()) == int(fan_in.max()) > 0
        # round(0.2 density of the ERK layer target / units): within one entry per unit of the budget
    assert sparse.exploration.summary()["fan_in_cv_max"] == 0.0


def test_constant_fan_in_units_of_a_conv1d_weight_are_its_columns():
    class Conv1D(nn.Module):  # GPT-2's layout: weight (in, out), y = x @ W
        def __init__(self, nx, nf):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)

        def forward(self, x):
            return x @ self.weight

    model = nn.Sequential(nn.Embedding(20, 16), Conv1D(16, 24), nn.ReLU(), nn.Linear(24, 20))
    assert output_axes(model)["1.weight"] == 1
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    sparse = rigl_ds.sparsify(
        model, opt, {"method": "set", "sparsity": 0.75, "delta_t": 2, "end_step": 10, "constant_fan_in": True,
                     "modules": ["1.weight"]}, total_steps=12
    )
    for _ in range(6):
        nn.functional.cross_entropy(model(torch.arange(20)), torch.arange(20)).backward()
        sparse.step()
        opt.zero_grad()
    per_column = sparse.masks["1.weight"].sum(dim=0)
    assert int(per_column.min()) == int(per_column.max()) == 4  # 16 inputs at 75% sparsity
    assert sparse.controller.updates >= 3


def test_n_m_masks_hold_exactly_n_of_every_m_consecutive_inputs_through_updates():
    block = {"method": "rigl", "sparsity": 0.5, "distribution": "uniform", "n_m": [2, 4], "alpha": 0.5,
             "drop_fraction_schedule": "constant", "delta_t": 3, "end_step": 30}
    model, opt, sparse = make(block)
    x, y = task()
    first = {n: m.clone() for n, m in sparse.masks.items()}
    for _ in range(31):
        train_step(model, opt, sparse, x, y)
    assert sum(int((first[n] != sparse.masks[n]).sum()) for n in MASKED) > 0
    for n in MASKED:
        groups = sparse.masks[n].reshape(sparse.masks[n].shape[0], -1, 4).sum(dim=2)
        assert bool((groups == 2).all())


def _grown_first_steps(block, optimizer="adam"):
    """Weight of each entry grown at the first RigL update, after the one optimizer step that follows."""
    block = {**BLOCK, "begin_step": 30, "drop_fraction_schedule": "constant", **block}
    model, opt, sparse = make(block, optimizer=optimizer, lr=1e-3)
    x, y = task()
    for _ in range(30):  # the first update is at step 30 (its optimizer step skipped)
        train_step(model, opt, sparse, x, y)
    before = {n: sparse.masks[n].clone() for n in MASKED}
    train_step(model, opt, sparse, x, y)  # step 30: the update
    grown = {n: sparse.masks[n] & ~before[n] for n in MASKED}
    train_step(model, opt, sparse, x, y)  # the first step the grown entries take
    params = dict(model.named_parameters())
    assert all(int(opt.state[params[n]]["step"]) == 31 for n in MASKED)
    return torch.cat([params[n].detach()[grown[n]] for n in MASKED])


def test_with_the_global_bias_correction_a_grown_entrys_first_step_is_scaled_by_the_global_count():
    steps = _grown_first_steps({}).abs()
    # Zero moments, one gradient, t = 31: lr * (1 - b1) / (1 - b1^t) / sqrt((1 - b2) / (1 - b2^t)) = 0.57 lr,
    # and 2.1 lr at t = 600 (4.4 lr ten steps later): the step size depends on when the entry grew.
    t = 31
    expected = 1e-3 * (0.1 / (1 - 0.9**t)) / (0.001 / (1 - 0.999**t)) ** 0.5
    assert steps.numel() > 0 and torch.allclose(steps, torch.full_like(steps, expected), rtol=1e-3)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_per_entry_bias_correction_gives_grown_entries_the_first_step_of_a_fresh_adam(optimizer):
    steps = _grown_first_steps({"grow_bias_correction": "per_entry"}, optimizer).abs()
    # k = 1: m / (1 - b1) = g, v / (1 - b2) = g^2, so the step is lr * |g| / (|g| + eps): lr, from weight 0.
    assert steps.numel() > 0
    assert torch.allclose(steps, torch.full_like(steps, 1e-3), rtol=1e-3, atol=0), steps[:5]


def test_grow_warmup_scales_a_grown_entrys_first_step_by_one_over_the_warmup():
    plain = _grown_first_steps({})
    warm = _grown_first_steps({"grow_warmup_steps": 4})
    assert torch.allclose(warm, plain / 4, rtol=1e-5, atol=1e-9)


def test_per_entry_bias_correction_needs_adam():
    with pytest.raises(ValueError, match="rigl.grow_bias_correction: 'per_entry'.*SGD"):
        make({**BLOCK, "grow_bias_correction": "per_entry"}, optimizer="sgd")


def test_entries_active_from_the_start_step_as_adam_says_under_every_plus_option():
    block = {**BLOCK, "begin_step": 10}
    plain_model, plain_opt, plain = make(block)
    plus_model, plus_opt, plus = make({**block, "grow_bias_correction": "per_entry", "grow_warmup_steps": 3})
    x, y = task()
    for _ in range(10):  # up to the first update: no entry has been grown
        train_step(plain_model, plain_opt, plain, x, y)
        train_step(plus_model, plus_opt, plus, x, y)
    for (n, p), q in zip(plain_model.named_parameters(), plus_model.parameters()):
        assert torch.equal(p, q), n


def test_itop_rate_starts_at_the_density_stays_there_without_updates_and_grows_with_them():
    for method, grows in (("static", False), ("set", True)):
        block = {"method": method, "sparsity": 0.8} if method == "static" else {**BLOCK, "method": method}
        model, opt, sparse = make(block)
        start = sparse.exploration.itop_rate()
        assert abs(start - 0.2) < 0.01
        x, y = task()
        for _ in range(20):
            train_step(model, opt, sparse, x, y)
        assert (sparse.exploration.itop_rate() > start + 0.02) == grows


def test_fan_in_counts_of_shard_ranges_add_up_to_the_whole_layers():
    layer = LayerPlan("w", (6, 10))
    mask = torch.rand(60, generator=torch.Generator().manual_seed(0)) < 0.3
    whole = fan_in_counts(layer, 0, mask)
    parts = fan_in_counts(layer, 0, mask[:23], 0) + fan_in_counts(layer, 0, mask[23:], 23)
    assert torch.equal(whole, parts) and torch.equal(whole, mask.view(6, 10).sum(1))
    columns = fan_in_counts(layer, 1, mask[:37], 0) + fan_in_counts(layer, 1, mask[37:], 37)
    assert torch.equal(columns, mask.view(6, 10).sum(0))
    assert coefficient_of_variation(torch.tensor([3, 3, 3])) == 0.0


@pytest.mark.parametrize(
    "plus", [{"grow_bias_correction": "per_entry"}, {"grow_warmup_steps": 8}], ids=["per_entry", "warmup"]
)
def test_resume_with_grown_entry_counts_is_bit_identical_to_an_uninterrupted_run(plus, tmp_path):
    # Saved at step 12, between the updates at 10 and 15 (delta_t 5): entries grown at 10 are young.
    block = {**BLOCK, **plus}
    x, y = task()
    model, opt, sparse = make(block)
    for _ in range(12):
        train_step(model, opt, sparse, x, y)
    assert any(bool((b >= 0).any()) for b in sparse.grown.born)
    steps_taken = sparse.grown.steps_taken  # optimizer steps taken (update steps skip theirs)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rigl": sparse.state_dict()}, path)
    for _ in range(20):
        train_step(model, opt, sparse, x, y)

    model2, opt2, sparse2 = make({**block, "seed": 99}, seed=123)  # other masks and weights until loaded
    ckpt = torch.load(path, weights_only=False)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sparse2.load_state_dict(ckpt["rigl"])
    assert sparse2.grown.steps_taken == steps_taken > 0
    for _ in range(20):
        train_step(model2, opt2, sparse2, x, y)
    assert sparse2.grown.steps_taken == sparse.grown.steps_taken
    assert all(torch.equal(a, b) for a, b in zip(sparse.grown.born, sparse2.grown.born))
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n


def test_an_older_checkpoint_without_grown_entry_counts_loads_with_no_entry_counted_as_grown():
    block = {**BLOCK, "grow_bias_correction": "per_entry"}
    model, opt, sparse = make(block)
    x, y = task()
    for _ in range(7):
        train_step(model, opt, sparse, x, y)
    assert any(bool((b >= 0).any()) for b in sparse.grown.born)
    state = sparse.state_dict()
    assert "grown" in state
    del state["grown"]  # what checkpoints written before the counts were saved hold
    _, _, fresh = make(block)
    fresh.load_state_dict(state)
    assert all(bool((b < 0).all()) for b in fresh.grown.born)


def test_without_grow_options_the_checkpoint_holds_no_grown_entry_counts():
    _, _, sparse = make(BLOCK)
    assert "grown" not in sparse.state_dict()


def test_grow_candidate_fraction_grows_only_inside_the_random_pool_and_is_rigl_only():
    block = {**BLOCK, "begin_step": 10, "drop_fraction_schedule": "constant", "grow_candidate_fraction": 0.25}
    model, opt, sparse = make(block)
    x, y = task()
    for _ in range(10):
        train_step(model, opt, sparse, x, y)
    before = {n: sparse.masks[n].clone() for n in MASKED}
    train_step(model, opt, sparse, x, y)  # the update at step 10
    from rigl_ds import keyed_random

    for n in MASKED:
        grown = (sparse.masks[n] & ~before[n]).reshape(-1)
        key = keyed_random.derive_key(0, "grow_pool", n, 10)
        u = keyed_random.uniform(key, torch.arange(grown.numel()))
        assert grown.sum() > 0 and bool((u[grown] < 0.25).all())
    with pytest.raises(RigLConfigError, match="grow_candidate_fraction is a setting of method 'rigl' only"):
        load_config({"method": "set", "grow_candidate_fraction": 0.5})


@pytest.mark.parametrize("name", ["rigl_plus.json", "rigl_plus_gpt2.json"])
def test_the_recommended_rigl_plus_block_loads_and_holds_only_options_away_from_the_paper_defaults(name):
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "configs" / name
    block = json.loads(path.read_text())["rigl"]
    config = load_config(path)
    defaults = load_config({})
    assert config.method == "rigl"
    assert all(getattr(config, k) != getattr(defaults, k) for k in block if k != "method"), block
