"""The DeepSpeed plugin on gloo ranks: every ZeRO stage and dtype keeps exact counts and exact zeros
in every copy of every weight (checked through DeepSpeed's own APIs), agrees with a world-size-1
run, resumes bit-identically, and rejects bad config values by name."""

import ds_sim
import pytest
import torch
from gloo import run_gloo

pytestmark = pytest.mark.slow

CASES = [(stage, dtype) for stage in (0, 1, 2, 3) for dtype in ("fp32", "bf16")]


@pytest.fixture(scope="module")
def every_stage():
    runs = [dict(stage=s, dtype=d) for s, d in CASES] + [dict(stage=s, dtype="fp32", family="lstm") for s in (2, 3)]
    per_rank = run_gloo(2, "ds_sim:train_many", runs)
    return {
        (r["stage"], r["dtype"], r.get("family", "gpt2")): [rank[i] for rank in per_rank] for i, r in enumerate(runs)
    }


@pytest.mark.parametrize(
    "stage,dtype,family", [(s, d, "gpt2") for s, d in CASES] + [(2, "fp32", "lstm"), (3, "fp32", "lstm")]
)
def test_counts_are_exact_and_masked_entries_zero_everywhere(every_stage, stage, dtype, family):
    ranks = every_stage[(stage, dtype, family)]
    for r in ranks:
        assert r["pool_counts"] == r["targets"]
        assert len(r["history"]) == 3  # updates at steps 0, 2, 4
        assert all(h[1] > 0 and h[2] == h[1] for h in r["history"])  # something moved, as much grew as dropped
        checked = {key for viol in r["violations"] for (_, key) in viol}
        assert {"low_precision", "fp32", "exp_avg", "exp_avg_sq"} <= checked
        bad = {k: v for viol in r["violations"] for k, v in viol.items() if v}
        assert not bad, bad
        assert all(torch.isfinite(torch.tensor(r["losses"])))
    # Every rank sees the same whole masks (replicas at stage 0, assembled shards otherwise).
    for step in range(len(ranks[0]["masks"])):
        for name, mask in ranks[0]["masks"][step].items():
            assert torch.equal(mask, ranks[1]["masks"][step][name])


def test_sharded_stages_hold_no_whole_mask_on_any_rank(every_stage):
    for stage in (1, 2, 3):
        assert every_stage[(stage, "fp32", "gpt2")][0]["layout"] != "whole"
        assert min(every_stage[(stage, "fp32", "gpt2")][0]["collectives"]) > 0


FIRST_UPDATE = [dict(stage=s, dtype=d, steps=1) for s in (1, 2, 3) for d in ("fp32", "bf16")]


@pytest.fixture(scope="module")
def world_one():
    return run_gloo(1, "ds_sim:train_many", FIRST_UPDATE)[0]


@pytest.mark.parametrize("world", [2, 4])
def test_masks_equal_a_world_size_one_run_given_the_same_weights_and_gradients(world_one, world):
    # Same batch on every rank: at the first update (step 0, before any optimizer step) the
    # reduced gradients are those of one process, and so must the masks be, at every stage.
    per_rank = run_gloo(world, "ds_sim:train_many", FIRST_UPDATE)
    for i, run in enumerate(FIRST_UPDATE):
        want = world_one[i]["masks"][0]
        assert world_one[i]["history"][0][1] > 0
        for rank in per_rank:
            for name, mask in want.items():
                assert torch.equal(rank[i]["masks"][0][name], mask), (run, name)


RESUME = [(0, "bf16"), (1, "bf16"), (2, "fp32"), (3, "fp32")]


def test_resuming_from_a_checkpoint_reaches_bit_identical_masks_and_weights(tmp_path):
    runs = []
    for stage, dtype in RESUME:
        folder = str(tmp_path / f"stage{stage}_{dtype}")
        runs.append(dict(stage=stage, dtype=dtype, steps=7, save_at=3, save_dir=folder))
        runs.append(dict(stage=stage, dtype=dtype, steps=7, load_dir=folder))
    per_rank = run_gloo(2, "ds_sim:train_many", runs)
    for rank in per_rank:
        for i in range(0, len(runs), 2):
            straight, resumed = rank[i], rank[i + 1]
            assert len(resumed["losses"]) == 4  # steps 3..6 after loading at step 3
            assert not any(v for viol in resumed["violations"] for v in viol.values())
            assert resumed["history"] == straight["history"][2:]  # the updates at steps 4 and 6
            for name, mask in straight["masks"][-1].items():
                assert torch.equal(resumed["masks"][-1][name], mask), (runs[i], name)
                for key, value in straight["final"][name].items():
                    assert torch.equal(resumed["final"][name][key], value), (runs[i], name, key)


@pytest.mark.parametrize(
    "block,key",
    [
        ({"sparsity": 1.5}, "rigl.sparsity"),
        ({"method": "rigl2"}, "rigl.method"),
        ({"delta_t": 0}, "rigl.delta_t"),
        ({"distribution": "erk", "dense_layers": ["no_such_layer"]}, "rigl.dense_layers"),
        ({"sparsity": 0.9, "colour": "blue"}, "rigl.colour"),
    ],
)
def test_bad_rigl_values_are_rejected_by_key_before_deepspeed_starts(block, key):
    import rigl_ds

    model = ds_sim.tiny_model("gpt2")
    with pytest.raises(rigl_ds.RigLConfigError, match=key.replace(".", r"\.")):
        # Without a process group: validation must fail before DeepSpeed would need one.
        rigl_ds.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds_sim.ds_config(2, "fp32", block)
        )


def test_a_config_without_the_block_trains_dense_with_deepspeed_untouched():
    for rank in run_gloo(2, "ds_sim:dense_without_block"):
        assert rank["is_deepspeed_engine"] and not rank["wrapped"] and rank["zeros"] == 0
