"""Keyed randomness: the same numbers for the same (key, global index), whatever the partition."""

import torch

from rigl_ds import keyed_random


def test_a_shard_draws_exactly_the_whole_tensors_numbers_for_its_range():
    key = keyed_random.derive_key(0, "set", "h.0.mlp.c_fc.weight", 300)
    whole = keyed_random.uniform(key, torch.arange(10_000))
    for start, stop in [(0, 3333), (3333, 6667), (6667, 10_000), (5, 6)]:
        assert torch.equal(keyed_random.uniform(key, torch.arange(start, stop)), whole[start:stop])
    big = torch.tensor([2**33 + 5, 2**40 + 1])  # layers beyond 2**32 entries
    assert torch.equal(keyed_random.uniform(key, big), keyed_random.uniform(key, big.clone()))


def test_uniform_is_in_unit_interval_and_roughly_uniform():
    u = keyed_random.uniform(keyed_random.derive_key(1, "init", "w"), torch.arange(200_000))
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert float(hist.min()) > 0.95 * 20_000 and float(hist.max()) < 1.05 * 20_000


def test_different_keys_give_different_streams():
    idx = torch.arange(1000)
    a = keyed_random.uniform(keyed_random.derive_key(0, "set", "w", 1), idx)
    b = keyed_random.uniform(keyed_random.derive_key(0, "set", "w", 2), idx)
    assert (a != b).float().mean() > 0.99
    assert keyed_random.derive_key(0, "x") == keyed_random.derive_key(0, "x")


def test_normal_has_unit_variance():
    z = keyed_random.normal(keyed_random.derive_key(3, "grow_init"), torch.arange(100_000))
    assert torch.isfinite(z).all()
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1.0) < 0.02


def test_a_range_drawn_in_chunks_is_the_same_numbers_as_one_draw():
    key = keyed_random.derive_key(7, "init", "layer")
    want = keyed_random.uniform(key, torch.arange(1000, 1000 + 12345))
    for chunk in (1, 1000, 12345, 1 << 20):
        assert torch.equal(keyed_random.uniform_range(key, 1000, 12345, chunk=chunk), want)
    assert keyed_random.uniform_range(key, 5, 0).numel() == 0
