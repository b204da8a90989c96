"""The DeepSpeed plugin on gloo ranks: every ZeRO stage and dtype keeps exact counts and exact zeros
in every copy of every weight (checked through DeepSpeed's own APIs), agrees with a world-size-1
run, resumes bit-identically, and rejects bad config values by name."""

import json

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


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sharded_stages_keep_mask_entries_only_for_what_the_rank_owns(every_stage, stage):
    ranks = every_stage[(stage, "fp32", "gpt2")]
    total = ranks[0]["masked_entries"]
    # The ranks' mask shards cover every entry exactly once: no rank holds a whole mask.
    assert sum(r["local_mask_entries"] for r in ranks) == total
    assert all(r["local_mask_entries"] < total for r in ranks)
    assert all(min(r["collectives"]) > 0 for r in ranks)  # agreed through collectives, not replicated


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


def _offload(stage):
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0, "offload_optimizer": {"device": "cpu"}}
    return {"zero_optimization": zero, "zero_force_ds_cpu_optimizer": False}


VARIANTS = {
    "grad_accumulation_stage2": dict(stage=2, dtype="bf16", steps=12, gradient_accumulation_steps=2),
    "grad_accumulation_stage3": dict(stage=3, dtype="fp32", steps=12, gradient_accumulation_steps=2),
    "offload_stage2": dict(stage=2, dtype="fp32", **_offload(2)),
    "offload_stage3": dict(stage=3, dtype="bf16", **_offload(3)),
    "set_stage3": dict(stage=3, dtype="fp32", rigl={**ds_sim.RIGL, "method": "set"}),
    "snfs_stage2": dict(stage=2, dtype="fp32", rigl={**ds_sim.RIGL, "method": "snfs"}),
    "gmp_stage1": dict(
        stage=1,
        dtype="bf16",
        rigl={"method": "gmp", "sparsity": 0.8, "initial_sparsity": 0.3, "delta_t": 2, "begin_step": 1, "end_step": 5},
    ),
    "static_stage3": dict(stage=3, dtype="fp32", rigl={"method": "static", "sparsity": 0.7}),
    "no_skip_stage2": dict(stage=2, dtype="fp32", rigl={**ds_sim.RIGL, "skip_optimizer_step_on_update": False}),
    # Every parameter persistent (kept gathered between steps): SET's after-step updates must reach
    # the gathered copies too, not only the partitions.
    "persistent_set_stage3": dict(
        stage=3,
        dtype="bf16",
        rigl={**ds_sim.RIGL, "method": "set"},
        zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 10**9},
    ),
}


@pytest.fixture(scope="module")
def variants():
    per_rank = run_gloo(2, "ds_sim:train_many", list(VARIANTS.values()))
    return {name: [rank[i] for rank in per_rank] for i, name in enumerate(VARIANTS)}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_accumulation_offload_and_every_method_keep_exact_counts_and_zeros(variants, name):
    expected_updates = {"static_stage3": 0, "gmp_stage1": 3}.get(name, 3)  # optimizer steps 0, 2, 4
    for r in variants[name]:
        assert r["pool_counts"] == r["targets"] or name == "gmp_stage1"
        assert len(r["history"]) == expected_updates, r["history"]
        bad = {k: v for viol in r["violations"] for k, v in viol.items() if v}
        assert not bad, bad
        assert all(torch.isfinite(torch.tensor(r["losses"])))
    if name == "gmp_stage1":  # pruned to the final sparsity by its last update, never grown
        r = variants[name][0]
        assert r["pool_counts"] == r["targets"] and all(h[2] == 0 for h in r["history"])


@pytest.mark.parametrize("stage,dtype", [(0, "bf16"), (2, "fp32"), (3, "bf16")])
def test_export_writes_the_consolidated_sparse_model_from_a_sharded_checkpoint(tmp_path, stage, dtype):
    from safetensors.torch import load_file

    from rigl_ds.export import main as export_main

    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "export")
    trained = run_gloo(2, "ds_sim:train_and_export", stage, dtype, ckpt)[0]
    export_main([ckpt, out])
    weights, masks = load_file(f"{out}/model.safetensors"), load_file(f"{out}/masks.safetensors")
    report = json.load(open(f"{out}/sparsity_report.json"))
    assert set(masks) == set(trained["masks"][-1])
    for name, mask in trained["masks"][-1].items():
        assert torch.equal(masks[name].bool().reshape(-1), mask)
        source = "low_precision" if stage == 0 else "fp32"  # ZeRO-0 checkpoints hold the module's own weights
        assert torch.equal(weights[name].reshape(-1), trained["final"][name][source])
        assert not bool((weights[name].reshape(-1)[~mask] != 0).any())
    assert [layer["active"] for layer in report["layers"]] == [r["active"] for r in trained["report"]]
    assert report["active_entries"] == sum(trained["pool_counts"])


def test_the_deepspeed_launcher_runs_a_user_script_unchanged(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    config = tmp_path / "ds.json"
    config.write_text(json.dumps(ds_sim.ds_config(2, "fp32", ds_sim.RIGL)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    script = os.path.join(os.path.dirname(__file__), "ds_launch_job.py")
    out = tmp_path / "report.json"
    done = subprocess.run(
        [
            launcher,
            "--num_gpus",
            "2",
            "--master_port",
            str(port),
            script,
            "--deepspeed_config",
            str(config),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["layout"] == "fragments" and result["updates"] == 2
    active, total = (sum(layer[k] for layer in result["report"]) for k in ("active", "numel"))
    assert abs(1 - active / total - 0.8) < 0.001  # ERK's split of 80% over the masked layers


@pytest.mark.parametrize("stage,dtype,method", [(2, "fp32", "snfs"), (3, "bf16", "rigl")])
def test_a_checkpoint_saved_on_two_ranks_loads_on_one_and_on_three(tmp_path, stage, dtype, method):
    import subprocess
    import sys

    ckpt = str(tmp_path / "ckpt")
    rigl = {**ds_sim.RIGL, "method": method}
    saved = run_gloo(
        2, "ds_sim:train_many", [dict(stage=stage, dtype=dtype, steps=3, save_at=3, save_dir=ckpt, rigl=rigl)]
    )[0][0]
    # DeepSpeed's own step for other world sizes: a universal checkpoint beside the saved one.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            f"{ckpt}/global_step3",
            "--output_folder",
            f"{ckpt}/global_step3_universal",
            "--inject_missing_state",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    for world in (1, 3):
        run = dict(stage=stage, dtype=dtype, steps=7, load_dir=ckpt, rigl=rigl, checkpoint={"load_universal": True})
        for r in (rank[0] for rank in run_gloo(world, "ds_sim:train_many", [run])):
            for name, mask in saved["masks"][-1].items():
                assert torch.equal(r["masks_at_load"][name], mask), (world, name)
            assert r["pool_counts"] == r["targets"] and len(r["history"]) == 2  # updates at steps 4 and 6
            assert not any(v for viol in r["violations"] for v in viol.values())
