"""bench/quality_study.py at every size: each run's ``"rigl"`` block is valid, and the ones with a
structure to meet (N:M, constant fan-in, mask groups) sparsify the size's own model, so ``--size gpu``
stays ready for a lent device without a GPU here to run it."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import quality_study as q  # noqa: E402

import rigl_ds  # noqa: E402
from rigl_ds.config import load_config  # noqa: E402
from rigl_ds.lm import build_model  # noqa: E402

STRUCTURED = ("n_m", "constant_fan_in", "mask_groups")


def _runs(size):
    seeds = q.SIZES[size]["seeds"]
    return [*q.settings(seeds, size), *q.plus_settings(seeds)]


@pytest.mark.parametrize("size", sorted(q.SIZES))
def test_every_sparse_run_of_the_size_has_a_valid_rigl_block(size):
    common = {**q.SIZES[size], "size": size}
    blocks = [q.rigl_block(r, common) for r in _runs(size) if r["method"] not in ("dense", "small_dense")]
    assert blocks and all(load_config(b).method in rigl_ds.METHODS for b in blocks)
    assert {b["method"] for b in blocks} >= {"static", "set", "snfs", "rigl", "gmp"}


@pytest.mark.parametrize("size", sorted(q.SIZES))
@pytest.mark.parametrize("family", ["char_gru", "gpt"])
def test_structured_variants_sparsify_the_sizes_model_at_their_exact_count(size, family):
    common = {**q.SIZES[size], "size": size}
    spec = q.SIZES[size][family]
    vocab = spec["vocab"] or 80
    seen = set()
    for run in q.plus_settings(1):
        block = q.rigl_block(run, common)
        structure = repr([block.get(k) for k in (*STRUCTURED, "sparsity")])  # what the masks must meet
        if run["family"] != family or not any(k in block for k in STRUCTURED) or structure in seen:
            continue
        seen.add(structure)
        torch.manual_seed(0)
        model = build_model(q._family(family), vocab, **spec["sizes"])
        sparse = rigl_ds.sparsify(model, torch.optim.Adam(model.parameters()), block, total_steps=spec["steps"])
        layers = sparse.layer_report()
        active, numel = sum(r["active"] for r in layers), sum(r["numel"] for r in layers)
        if "n_m" in block:
            n, m = block["n_m"]
            assert active * m == numel * n, block  # exactly N of every M, in every layer
        else:
            assert abs(1 - active / numel - block["sparsity"]) < 0.01, (block, active, numel)
    assert seen, "no structured variant ran"
