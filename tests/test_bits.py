"""Masks at one bit per entry (rigl_ds.bits): packing round-trips exactly, counts need no unpacking,
and a shard keeps only the bits."""

import pytest
import torch

import rigl_ds
from rigl_ds import bits


@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 1000, 4099])
def test_pack_then_unpack_is_the_identity_and_count_is_the_number_of_true_entries(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < 0.3
    packed = bits.pack(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 7) // 8
    out = bits.unpack(packed, numel)
    assert out.dtype == torch.bool and torch.equal(out, mask)
    assert int(bits.count(packed)) == int(mask.sum())


def test_every_byte_value_counts_its_set_bits():
    every = torch.arange(256, dtype=torch.uint8)
    assert int(bits.count(every)) == sum(bin(i).count("1") for i in range(256))
    assert torch.equal(bits.pack(bits.unpack(every, 2048)), every)


def test_unpack_refuses_a_size_that_does_not_match():
    with pytest.raises(ValueError, match="need 2 uint8 bytes"):
        bits.unpack(torch.zeros(3, dtype=torch.uint8), 16)


def test_a_shard_holds_its_mask_as_bits_and_takes_new_masks_by_assignment():
    model = torch.nn.Sequential(torch.nn.Linear(30, 40), torch.nn.ReLU(), torch.nn.Linear(40, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = rigl_ds.sparsify(
        model, opt, {"method": "rigl", "sparsity": 0.9, "delta_t": 5, "end_step": 50, "modules": ["0"]}
    )
    (shard,) = sparse.shards
    assert shard.mask_bits.dtype == torch.uint8 and shard.mask_bits.numel() == 1200 // 8
    assert int(shard.active_count()) == int(shard.mask.sum()) == 120
    new = torch.arange(1200) < 120
    shard.mask = new
    assert torch.equal(sparse.masks["0.weight"].view(-1), new)
    with pytest.raises(ValueError, match="1200 bool entries"):
        shard.mask = torch.ones(10, dtype=torch.bool)


def test_unpacking_into_a_reused_buffer_gives_the_same_mask():
    from rigl_ds import bits

    scratch = torch.full((64,), 7, dtype=torch.uint8)  # stale bytes from an earlier use
    for numel in (1, 8, 13, 64):
        mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < 0.3
        packed = bits.pack(mask)
        assert torch.equal(bits.unpack(packed, numel, scratch), mask)
        assert torch.equal(bits.unpack(packed, numel, scratch), bits.unpack(packed, numel))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_per_step_gradient_masking_is_bit_for_bit_torch_where_even_at_nan_inf_and_negative_zero(dtype):
    from rigl_ds import masks

    numel = 1003
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(numel, generator=gen).to(dtype)
    grad[::7], grad[::11], grad[::13] = float("nan"), float("-inf"), -0.0  # masked or not, by chance
    mask = torch.rand(numel, generator=gen) < 0.3
    expected = torch.where(mask, grad, torch.zeros((), dtype=dtype))
    scratch = torch.full((bits.packed_numel(numel) * 8,), 5, dtype=torch.uint8)
    masks._zero_masked_consuming(grad, bits.unpack(bits.pack(mask), numel, scratch))
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[grad.element_size()]
    assert torch.equal(grad.view(as_int), expected.view(as_int))  # +0.0 at masked entries, active bits kept
    assert not torch.isnan(grad[~mask]).any()
