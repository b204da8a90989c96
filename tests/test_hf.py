"""rigl_ds under transformers.Trainer (TrainingArguments(deepspeed=...)) and under accelerate, on
2 gloo CPU ranks at ZeRO 2 and 3: exact per-layer counts, zeros at masked entries, the same masks
on every rank, masks that move only on optimizer steps, a Trainer resume bit-identical to an
uninterrupted run, and bad "rigl" values rejected by name."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from gloo import run_gloo

STAGES = (2, 3)
MAX_STEPS = 8  # Trainer runs: end_fraction 0.75 of max_steps ends updates at step 6
SAVE_AT = 3  # the resumed run's first update (step 4) moves weights, and needs the saved schedule


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every multi-process run of this file in one set of 2 ranks (start-up paid once)."""
    root = tmp_path_factory.mktemp("hf")
    plan = {("rejected",): ("rejected", dict(bad={"sparsity": 1.5}, output_dir=str(root / "rejected")))}
    for stage in STAGES:
        accum = 2 if stage == 3 else 1  # ZeRO-3 also accumulates two micro-batches per optimizer step
        full, resumed = root / f"z{stage}", root / f"z{stage}_resumed"
        plan[("accelerate", stage)] = ("accelerate", dict(stage=stage))
        plan[("trainer", stage)] = (
            "trainer",
            dict(stage=stage, output_dir=str(full), max_steps=MAX_STEPS, save_steps=SAVE_AT, grad_accum=accum),
        )
        plan[("resumed", stage)] = (
            "trainer",
            dict(
                stage=stage,
                output_dir=str(resumed),
                max_steps=MAX_STEPS,
                resume=str(full / f"checkpoint-{SAVE_AT}"),
                grad_accum=accum,
            ),
        )
    plan[("late", 2)] = ("trainer", dict(stage=2, output_dir=str(root / "late"), max_steps=MAX_STEPS, hooked=False))
    per_rank = run_gloo(2, "hf_sim:many", list(plan.values()), timeout=1200)
    return {key: [rank[i] for rank in per_rank] for i, key in enumerate(plan)}


def _check_sparse_and_consistent(ranks, layout):
    for r in ranks:
        assert r["layout"] == layout
        assert r["pool_counts"] == r["targets"]
        assert sum(layer["active"] for layer in r["report"]) == sum(r["targets"])
        bad = {k: v for k, v in r["violations"].items() if v}
        assert not bad, bad  # masked entries zero in the weights, fp32 master and Adam moments
        assert {key for (_, key) in r["violations"]} >= {"low_precision", "fp32", "exp_avg", "exp_avg_sq"}
    # Each rank holds only its own slice of the masks, and the assembled masks agree.
    assert sum(r["local_mask_entries"] for r in ranks) == ranks[0]["masked_entries"]
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name])
    assert ranks[0]["report"] == ranks[1]["report"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_trainer_with_a_rigl_block_trains_sparse_with_exact_counts(runs, stage):
    ranks = runs[("trainer", stage)]
    _check_sparse_and_consistent(ranks, "stage3" if stage == 3 else "fragments")
    for r in ranks:
        assert r["distributed_type"] == "DistributedType.DEEPSPEED" and r["num_processes"] == 2
        assert r["same_sparse"] and r["is_callback"]
        # total_steps is the Trainer's max_steps: end_fraction 0.75 of 8 steps ends at step 6.
        assert r["end_step"] == 6
        assert [h[0] for h in r["history"]] == [0, 2, 4, 6]
        assert all(h[1] > 0 and h[2] == h[1] for h in r["history"][:3])  # weights moved, as many grew as dropped
        # Steps are optimizer steps, with or without accumulation.
        assert r["controller_step"] == r["engine_steps"] == MAX_STEPS


@pytest.mark.slow
def test_callback_attaching_at_train_begin_trains_the_same_as_at_prepare(runs):
    # A Trainer that replaced its accelerator (hyperparameter search) prepares unhooked; a fresh
    # run then attaches at on_train_begin, with the same result.
    for hooked, late in zip(runs[("trainer", 2)], runs[("late", 2)]):
        assert late["history"] == hooked["history"]
        for name, mask in hooked["masks"].items():
            assert torch.equal(late["masks"][name], mask), name
            assert torch.equal(late["weights"][name], hooked["weights"][name]), name


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_trainer_logs_carry_rigl_metrics(runs, stage):
    r = runs[("trainer", stage)][0]
    step_logs = [e for e in r["logs"] if "loss" in e]
    assert len(step_logs) == MAX_STEPS
    assert [e["rigl/updates"] for e in step_logs] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert all(e["rigl/n_active"] == sum(r["targets"]) for e in step_logs)
    assert step_logs[0]["rigl/drop_fraction"] == pytest.approx(0.3)  # alpha at the first update
    assert 0.79 < step_logs[-1]["rigl/sparsity"] < 0.81


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_resuming_a_trainer_checkpoint_matches_the_uninterrupted_run(runs, stage):
    full, resumed = runs[("trainer", stage)], runs[("resumed", stage)]
    assert f"checkpoint-{SAVE_AT}" in full[0]["checkpoints"]
    _check_sparse_and_consistent(resumed, "stage3" if stage == 3 else "fragments")
    for f, r in zip(full, resumed):
        # The resumed run's updates continue the saved schedule (steps 4 and 6) and move the same entries.
        assert r["history"] == f["history"][2:]
        assert r["controller_step"] == r["engine_steps"] == MAX_STEPS
        for name, mask in f["masks"].items():
            assert torch.equal(r["masks"][name], mask), name
            assert torch.equal(r["weights"][name], f["weights"][name]), name
        assert [e["loss"] for e in r["logs"] if "loss" in e] == [e["loss"] for e in f["logs"] if "loss" in e]


def _masks_differ(a, b) -> bool:
    return any(not torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_accelerate_loop_updates_masks_on_optimizer_steps_only(runs, stage):
    ranks = runs[("accelerate", stage)]
    _check_sparse_and_consistent(ranks, "stage3" if stage == 3 else "fragments")
    for r in ranks:
        assert r["distributed_type"] == "DistributedType.DEEPSPEED" and r["num_processes"] == 2
        assert r["same_sparse"]
        assert [h[0] for h in r["history"]] == [0, 2, 4]  # 12 micro-batches, 2 per step: updates every 2 steps
        assert all(h[1] > 0 for h in r["history"][:2])
        micro = r["per_micro_batch"]
        assert [m["sync"] for m in micro] == [False, True] * 6
        for i, m in enumerate(micro):
            assert m["controller_step"] == m["engine_steps"] == (i + 1) // 2
            if not m["sync"] and i > 0:  # between optimizer steps nothing changes
                assert m["updates"] == micro[i - 1]["updates"]
                assert not _masks_differ(m["masks"], micro[i - 1]["masks"])
        moved = [i for i in range(1, len(micro)) if _masks_differ(micro[i]["masks"], micro[i - 1]["masks"])]
        assert moved == [1, 5]  # the updates of steps 0 and 2 (step 4's drop fraction is 0); both sync micro-batches


@pytest.mark.slow
def test_a_bad_rigl_value_is_rejected_naming_the_key(runs):
    for rank in runs[("rejected",)]:
        errors = rank["errors"]
        assert set(errors) == {"trainer", "accelerate"}
        for message in errors.values():
            assert "rigl.sparsity" in message and "1.5" in message


def test_sparsify_before_prepare_says_what_to_do():
    from rigl_ds.integrations.accelerate import sparsify

    with pytest.raises(RuntimeError, match="after accelerator.prepare"):
        sparsify(SimpleNamespace(deepspeed_engine_wrapped=None))


def test_rigl_ds_and_its_integrations_import_without_transformers_or_accelerate():
    code = (
        "import sys, rigl_ds, rigl_ds.integrations, rigl_ds.integrations.deepspeed, rigl_ds.integrations.accelerate;"
        "assert 'transformers' not in sys.modules and 'accelerate' not in sys.modules, sorted(sys.modules)"
    )  # RigLCallback itself comes through the lazy export in the Trainer runs
    subprocess.run([sys.executable, "-c", code], check=True)
