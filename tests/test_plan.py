"""The plan: mask groups as a function of the global flat index, pools, and exact targets."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rigl_ds.config import load_config
from rigl_ds.plan import LayerPlan, build_plan


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_block_of_a_global_index_matches_chunking_the_tensor(data):
    ndim = data.draw(st.integers(2, 4))
    shape = [data.draw(st.integers(1, 6)) for _ in range(ndim)]
    axis = data.draw(st.integers(0, ndim - 1))
    blocks = data.draw(st.integers(1, 4))
    shape[axis] *= blocks  # divisible by construction
    layer = LayerPlan("w", tuple(shape), axis=axis, blocks=blocks, pools=tuple(range(blocks)))
    reference = torch.empty(shape, dtype=torch.long)
    for b, chunk in enumerate(torch.chunk(torch.arange(math.prod(shape)).view(shape), blocks, dim=axis)):
        reference.view(-1)[chunk.reshape(-1)] = b
    assert torch.equal(layer.block_of(torch.arange(math.prod(shape))), reference.view(-1))
    # any contiguous shard computes the same ids for its range
    start = data.draw(st.integers(0, math.prod(shape) - 1))
    stop = data.draw(st.integers(start, math.prod(shape)))
    assert torch.equal(layer.pool_ids(torch.arange(start, stop)), reference.view(-1)[start:stop])


def test_pools_and_targets_per_distribution():
    shapes = {"a": (8, 12), "b": (12, 8), "c": (4, 4)}
    per_layer = build_plan(
        load_config({"sparsity": 0.5, "distribution": "uniform", "mask_groups": {"a": {"axis": 1, "blocks": 3}}}),
        shapes,
    )
    assert [layer.pools for layer in per_layer.layers] == [(0, 1, 2), (3,), (4,)]
    assert per_layer.targets(0.5).tolist() == [16, 16, 16, 48, 8]
    assert per_layer.pool_sizes().tolist() == [32, 32, 32, 96, 16]

    glob = build_plan(load_config({"sparsity": 0.5, "distribution": "global", "custom_sparsity": {"c": 0.25}}), shapes)
    assert [layer.pools for layer in glob.layers] == [(0,), (0,), (1,)]
    assert glob.targets(0.5).tolist() == [96, 12]  # a and b share one budget; c keeps 16 - floor(4)

    dense = build_plan(load_config({"sparsity": 0.5, "distribution": "erk", "dense_layers": ["c"]}), shapes)
    assert [layer.name for layer in dense.layers] == ["a", "b"]  # no mask for the dense layer
    assert int(dense.targets(0.5).sum()) in range(96 - 8, 96 - 8 + 3)  # c's 8 zeros are paid by a and b
