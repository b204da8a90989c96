"""Sparsity distributions: exact integer-count budget, the ERK overflow loop, and the error branches."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rigl_ds.distributions import free_budget, layer_sparsities, zeros_for


def active(shapes, sparsities):
    return {n: math.prod(s) - zeros_for(sparsities[n], math.prod(s)) for n, s in shapes.items()}


def test_uniform_gives_every_layer_the_same_sparsity_and_exact_zero_counts():
    shapes = {"a": (10, 7), "b": (3, 3, 3, 3)}
    s = layer_sparsities(shapes, 0.75, "uniform")
    assert s == {"a": 0.75, "b": 0.75}
    assert active(shapes, s) == {"a": 70 - 52, "b": 81 - 60}  # floor(0.75 N) zeros


def test_erk_matches_a_hand_computed_case():
    # S = 0.5, A (4, 4), B (2, 8): budget 8 + 8 = 16; raw 8/16 and 10/16; eps = 16 / 18.
    s = layer_sparsities({"A": (4, 4), "B": (2, 8)}, 0.5, "erk")
    assert s["A"] == pytest.approx(1 - Fraction(4, 9), abs=1e-12)
    assert s["B"] == pytest.approx(1 - Fraction(5, 9), abs=1e-12)


def test_erk_overflow_makes_the_densest_layer_dense_and_solves_again():
    # A (1, 100) has raw score 1.01 and cannot be sparser than dense at any eps >= 1: it must go dense,
    # and B then pays for A's share: B keeps 5000 - 50 = 4950 of 10000 entries.
    s = layer_sparsities({"A": (1, 100), "B": (100, 100)}, 0.5, "erk")
    assert s["A"] == 0.0
    assert s["B"] == pytest.approx(0.505, abs=1e-12)
    assert sum(active({"A": (1, 100), "B": (100, 100)}, s).values()) == 5050


def test_erk_overflow_loop_repeats_until_every_density_fits():
    shapes = {"tiny": (2, 2), "small": (4, 8), "mid": (32, 64), "big": (256, 256)}
    s = layer_sparsities(shapes, 0.5, "erk")
    assert s["tiny"] == 0.0 and s["small"] == 0.0  # two rounds of the loop
    assert all(0.0 <= v < 1.0 for v in s.values())


def test_er_uses_the_two_matrix_dims_and_erk_all_dims():
    shapes = {"conv": (16, 8, 3, 3), "fc": (64, 32)}
    er = layer_sparsities(shapes, 0.8, "er")
    erk = layer_sparsities(shapes, 0.8, "erk")

    # density ratio conv/fc equals the raw-score ratio of each method
    def ratio(s):
        return (1 - s["conv"]) / (1 - s["fc"])

    assert ratio(er) == pytest.approx(((16 + 8) / (16 * 8)) / ((64 + 32) / (64 * 32)))
    assert ratio(erk) == pytest.approx(((16 + 8 + 3 + 3) / (16 * 8 * 9)) / ((64 + 32) / (64 * 32)))


def test_erk_power_scale_flattens_the_distribution():
    shapes = {"a": (16, 16), "b": (128, 128)}

    def spread(power):
        s = layer_sparsities(shapes, 0.9, "erk", erk_power_scale=power)
        return s["b"] - s["a"]

    assert 0 < spread(0.5) < spread(1.0)
    assert spread(0.0) == pytest.approx(0.0, abs=1e-12)  # power 0 is uniform


def test_dense_layers_count_in_the_budget_and_custom_layers_do_not():
    shapes = {"a": (64, 64), "b": (64, 64), "c": (32, 64)}
    s = layer_sparsities(shapes, 0.5, "erk", dense=["c"])
    assert s["c"] == 0.0 and s["a"] > 0.5  # the others pay for the dense layer
    assert sum(active(shapes, s).values()) - sum(active(shapes, {n: 0.5 for n in shapes}).values()) in range(0, 3)
    s = layer_sparsities(shapes, 0.9, "erk", custom={"c": 0.5})
    assert s["c"] == 0.5
    free = {n: shapes[n] for n in ("a", "b")}
    assert free_budget(shapes, 0.9, [], {"c": 0.5}) == 2 * (4096 - 3686)
    assert sum(active(free, s).values()) - free_budget(shapes, 0.9, [], {"c": 0.5}) in range(0, 2)


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=6),
    sparsity=st.floats(0.0, 0.99),
    method=st.sampled_from(["er", "erk"]),
)
def test_er_and_erk_meet_the_uniform_budget_in_integer_counts(shapes, sparsity, method):
    shapes = {f"l{i}": s for i, s in enumerate(shapes)}
    s = layer_sparsities(shapes, sparsity, method)
    budget = free_budget(shapes, sparsity, [], {})
    # Real-valued densities meet the budget exactly; floor(s N) zeros per layer keeps each layer
    # within one entry above its share.
    assert sum((1 - s[n]) * math.prod(shapes[n]) for n in shapes) == pytest.approx(budget, rel=1e-9, abs=1e-6)
    assert 0 <= sum(active(shapes, s).values()) - budget <= len(shapes)
    assert all(0.0 <= v < 1.0 + 1e-12 for v in s.values())


def test_global_keeps_one_magnitude_threshold_across_layers():
    torch.manual_seed(0)
    weights = {"a": torch.randn(20, 30), "b": torch.randn(40, 10) * 3}
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    s = layer_sparsities(shapes, 0.7, "global", weights=weights)
    kept = {n: round((1 - s[n]) * w.numel()) for n, w in weights.items()}
    assert sum(kept.values()) == free_budget(shapes, 0.7, [], {})
    assert s["b"] < s["a"]  # larger weights keep more
    threshold = (
        torch.cat([w.flatten().abs() for w in weights.values()]).sort(descending=True).values[sum(kept.values()) - 1]
    )
    for n, w in weights.items():
        assert int((w.abs() >= threshold).sum()) == kept[n]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="lognormal"), "distribution method 'lognormal' is unknown; allowed: uniform, er, erk, global"),
        (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
        (dict(sparsity=-0.5), r"sparsity must be in \[0, 1\)"),
        (dict(dense=["zz"]), r"dense layers not among the sparsified layers: \['zz'\]"),
        (dict(custom={"zz": 0.1}), r"custom_sparsity names layers .*\['zz'\]"),
        (dict(custom={"a": 1.5}), r"custom sparsities must be in \[0, 1\)"),
        (dict(dense=["a"], custom={"a": 0.2}), r"layers both dense and custom: \['a'\]"),
        (dict(method="global"), "needs the layers' weights"),
        (dict(dense=["a"], sparsity=0.95), "dense layers use the whole parameter budget"),
        (dict(shapes={"a": (10, 10), "b": (10, 10)}, dense=["a"], sparsity=0.5), "leaving nothing for"),
        (
            dict(method="global", dense=["a"], sparsity=0.95, weights={"b": torch.ones(3, 4)}),
            "dense layers use the whole",
        ),
    ],
)
def test_bad_arguments_raise_value_error_that_says_which(kwargs, match):
    args = dict(shapes={"a": (100, 100), "b": (3, 4)}, sparsity=0.9, method="erk")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        layer_sparsities(args.pop("shapes"), args.pop("sparsity"), **args)


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=5))
def test_sparsity_zero_is_all_dense_whatever_the_float_rounding(shapes):
    shapes = {f"l{i}": s for i, s in enumerate(shapes)}
    s = layer_sparsities(shapes, 0.0, "erk")
    assert all(zeros_for(v, math.prod(shapes[n])) == 0 for n, v in s.items())


def test_non_matrix_shapes_are_rejected():
    with pytest.raises(ValueError, match="not a weight matrix"):
        layer_sparsities({"bias": (10,)}, 0.5)
