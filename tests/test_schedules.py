"""Update rule, drop-fraction schedules and the GMP sparsity schedule at known steps."""

import math

import pytest

from rigl_ds.schedules import drop_fraction, gmp_sparsity, is_update_step


def test_cosine_drop_fraction_at_known_steps():
    assert drop_fraction(0, 0.3, 0, 1000) == pytest.approx(0.3)
    assert drop_fraction(250, 0.3, 0, 1000) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert drop_fraction(500, 0.3, 0, 1000) == pytest.approx(0.15)
    assert drop_fraction(1000, 0.3, 0, 1000) == pytest.approx(0.0, abs=1e-12)
    assert drop_fraction(5000, 0.3, 0, 1000) == pytest.approx(0.0, abs=1e-12)


def test_cosine_reads_the_absolute_step_as_the_reference_does():
    # rigl/sparse_optimizers_base.py: cosine_decay(alpha, global_step, end - begin)
    assert drop_fraction(200, 0.3, 200, 1200) == pytest.approx(0.15 * (1 + math.cos(math.pi * 0.2)))


def test_linear_and_constant_drop_fraction():
    assert drop_fraction(200, 0.4, 200, 1200, "linear") == pytest.approx(0.4)
    assert drop_fraction(700, 0.4, 200, 1200, "linear") == pytest.approx(0.2)
    assert drop_fraction(1200, 0.4, 200, 1200, "linear") == pytest.approx(0.0)
    assert drop_fraction(777, 0.4, 200, 1200, "constant") == 0.4
    with pytest.raises(ValueError, match="allowed: cosine, constant, linear"):
        drop_fraction(1, 0.3, 0, 10, "step")
    with pytest.raises(ValueError, match="greater than begin"):
        drop_fraction(1, 0.3, 10, 10)


def test_updates_start_at_begin_and_repeat_every_delta_t_until_end():
    begin, end, dt = 5, 40, 10
    last, updates = begin - dt, []
    for t in range(60):
        if is_update_step(t, last, begin, end, dt):
            updates.append(t)
            last = t
    assert updates == [5, 15, 25, 35]


def test_a_skipped_update_is_retried_on_the_next_step():
    assert is_update_step(10, 0, 0, 100, 10)
    assert is_update_step(11, 0, 0, 100, 10)  # step 10's update was skipped: last update is still 0
    assert not is_update_step(11, 10, 0, 100, 10)


def test_no_end_means_updates_never_stop():
    assert is_update_step(10**6, 10**6 - 100, 0, None, 100)


def test_gmp_sparsity_follows_the_cubic_schedule():
    assert gmp_sparsity(0, 0.9, 0.0, 100, 1100) == 0.0  # before t0: initial
    assert gmp_sparsity(100, 0.9, 0.0, 100, 1100) == 0.0
    assert gmp_sparsity(600, 0.9, 0.0, 100, 1100) == pytest.approx(0.9 - 0.9 * 0.5**3)
    assert gmp_sparsity(1100, 0.9, 0.0, 100, 1100) == pytest.approx(0.9)
    assert gmp_sparsity(5000, 0.9, 0.2, 100, 1100) == pytest.approx(0.9)
    values = [gmp_sparsity(t, 0.9, 0.2, 0, 100) for t in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:]))
