"""The "rigl" block: paper defaults, and every bad value rejected with its key and what is allowed."""

import json

import pytest
import torch
from helpers import TinyLM
from pydantic import ValidationError

import rigl_ds
from rigl_ds.config import RigLConfig, RigLConfigError, load_config


def test_defaults_are_the_papers():
    c = load_config({})
    assert (c.method, c.distribution, c.delta_t, c.alpha, c.end_fraction, c.begin_step) == (
        "rigl",
        "erk",
        100,
        0.3,
        0.75,
        0,
    )
    assert c.drop_fraction_schedule == "cosine" and c.grow_init == "zeros" and c.grad_ema_decay == 0.9
    assert c.skip_step_on_update is True  # the reference skips the optimizer step on RigL updates
    assert load_config({"method": "set"}).skip_step_on_update is False
    assert load_config({"method": "snfs", "skip_optimizer_step_on_update": True}).skip_step_on_update is True


def test_config_keys_are_the_json_keys(tmp_path):
    block = {"method": "snfs", "sparsity": 0.8, "distribution": "uniform", "delta_t": 50, "alpha": 0.5, "end_step": 900}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, "rigl": block}))
    for source in (block, {"rigl": block}, str(path), path):
        c = load_config(source)
        assert c.model_dump(include=set(block)) == block


@pytest.mark.parametrize(
    "block, key, allowed",
    [
        ({"method": "dense"}, "rigl.method", "static, set, rigl, snfs, gmp"),
        ({"distribution": "erdos"}, "rigl.distribution", "uniform, er, erk, global"),
        ({"drop_fraction_schedule": "exp"}, "rigl.drop_fraction_schedule", "cosine, constant, linear"),
        ({"grow_init": "ones"}, "rigl.grow_init", "zeros, random_normal"),
        ({"sparsity": 1.0}, "rigl.sparsity", "[0, 1)"),
        ({"sparsity": -0.1}, "rigl.sparsity", "[0, 1)"),
        ({"sparsity": float("nan")}, "rigl.sparsity", "[0, 1)"),
        ({"sparsity": "high"}, "rigl.sparsity", "number"),
        ({"delta_t": 0}, "rigl.delta_t", "greater than or equal to 1"),
        ({"alpha": 0.0}, "rigl.alpha", "greater than 0"),
        ({"alpha": 1.5}, "rigl.alpha", "less than or equal to 1"),
        ({"begin_step": -1}, "rigl.begin_step", "greater than or equal to 0"),
        ({"end_fraction": 0.0}, "rigl.end_fraction", "greater than 0"),
        ({"end_fraction": 1.2}, "rigl.end_fraction", "less than or equal to 1"),
        ({"end_step": 10, "begin_step": 10}, "rigl", "must be greater than begin_step"),
        ({"end_step": 100, "end_fraction": 0.5}, "rigl", "either end_step or end_fraction"),
        ({"custom_sparsity": {"fc1": 1.0}}, "rigl.custom_sparsity", "[0, 1)"),
        (
            {"dense_layers": ["fc1"], "custom_sparsity": {"fc1": 0.5}},
            "rigl",
            "both in dense_layers and custom_sparsity",
        ),
        ({"initial_sparsity": 0.5}, "rigl", "method 'gmp' only"),
        ({"method": "gmp", "sparsity": 0.5, "initial_sparsity": 0.7}, "rigl", "must not exceed sparsity"),
        ({"modules": []}, "rigl.modules", "non-empty list"),
        ({"modules": ["fc1", ""]}, "rigl.modules", "non-empty list"),
        ({"erk_power_scale": 0}, "rigl.erk_power_scale", "greater than 0"),
        ({"grad_ema_decay": 1.0}, "rigl.grad_ema_decay", "less than 1"),
        ({"seed": -3}, "rigl.seed", "greater than or equal to 0"),
        (
            {"mask_groups": {"fc1": {"axis": 0, "blocks": 0}}},
            "rigl.mask_groups.fc1.blocks",
            "greater than or equal to 1",
        ),
        ({"mask_groups": {"fc1": {"axis": 0}}}, "rigl.mask_groups.fc1.blocks", "Field required"),
        ({"sparsty": 0.9}, "rigl.sparsty", "unknown key; allowed keys: method, sparsity"),
    ],
)
def test_every_bad_value_is_rejected_with_its_key(block, key, allowed):
    with pytest.raises(RigLConfigError) as err:
        load_config(block)
    msg = str(err.value)
    assert f"{key}:" in msg and allowed in msg, msg


def test_all_errors_are_reported_at_once():
    with pytest.raises(RigLConfigError) as err:
        load_config({"method": "x", "sparsity": 2, "delta_t": 0})
    assert all(k in str(err.value) for k in ("rigl.method", "rigl.sparsity", "rigl.delta_t"))


def test_bad_sources_are_rejected(tmp_path):
    with pytest.raises(RigLConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")
    with pytest.raises(RigLConfigError, match="must be a JSON object"):
        load_config({"rigl": [1, 2]})
    with pytest.raises(RigLConfigError, match="must be a dict"):
        load_config(42)


def test_end_step_needs_total_steps_when_only_end_fraction_is_set():
    c = load_config({"end_fraction": 0.5})
    assert c.resolve_end_step(1000) == 500
    with pytest.raises(RigLConfigError, match="rigl.end_step: not set"):
        c.resolve_end_step(None)
    with pytest.raises(RigLConfigError, match="rigl.end_fraction"):
        load_config({"begin_step": 10, "end_fraction": 0.5}).resolve_end_step(20)
    assert load_config({"method": "static"}).resolve_end_step(None) is None


@pytest.mark.parametrize(
    "block, key",
    [
        ({"modules": ["*.nothing"]}, "rigl.modules"),
        ({"modules": ["fc1.bias"]}, "rigl.modules"),
        ({"dense_layers": ["fc9"]}, "rigl.dense_layers"),
        ({"custom_sparsity": {"fc9": 0.5}}, "rigl.custom_sparsity"),
        ({"mask_groups": {"fc9": {"axis": 0, "blocks": 2}}}, "rigl.mask_groups"),
        ({"mask_groups": {"fc1": {"axis": 0, "blocks": 5}}}, "rigl.mask_groups.fc1"),
        ({"mask_groups": {"fc1": {"axis": 3, "blocks": 2}}}, "rigl.mask_groups.fc1"),
        ({"dense_layers": ["fc1", "fc2"]}, "rigl.dense_layers"),
        ({"custom_sparsity": {"fc1": 0.5, "fc*": 0.6}}, "rigl.custom_sparsity"),
        ({"mask_groups": {"fc1": {"axis": 0, "blocks": 2}, "fc*": {"axis": 0, "blocks": 4}}}, "rigl.mask_groups"),
        ({"dense_layers": ["fc1"], "custom_sparsity": {"fc*": 0.5}}, "rigl.dense_layers and rigl.custom_sparsity"),
        ({"sparsity": 0.5, "dense_layers": ["fc2"]}, "rigl.sparsity / rigl.dense_layers"),
        ({"sparsity": 0.5, "dense_layers": ["fc2"], "distribution": "global"}, "rigl.sparsity / rigl.dense_layers"),
    ],
)
def test_patterns_are_checked_against_the_model(block, key):
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RigLConfigError) as err:
        rigl_ds.sparsify(model, opt, {**block, "end_step": 10})
    assert key in str(err.value), str(err.value)


def test_masked_weights_must_be_in_the_optimizer():
    model = TinyLM()
    opt = torch.optim.SGD(model.fc2.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fc1.weight"):
        rigl_ds.sparsify(model, opt, {"end_step": 10})


def test_config_is_frozen():
    c = RigLConfig()
    with pytest.raises(ValidationError, match="frozen"):
        c.sparsity = 0.5
