"""Checkpoints of pipeline-parallel engines (``PipelineModule`` + ``train_batch``): rank files named by
the rank's coordinates (pipeline stage, data-parallel rank), a completeness record that waits for every
stage, each stage reading back its own files, and export assembling every stage's layers."""

import json
import math
import os
import shutil

import pipe_sim
import pytest
import torch
from gloo import run_gloo

from rigl_ds import checkpoint
from rigl_ds.checkpoint import CheckpointLayoutError, CheckpointWriteError, IncompleteCheckpointError

# -- a DeepSpeed pipeline of 2 stages on 2 gloo ranks ---------------------------------------------

# (ZeRO stage, dtype): DeepSpeed pipelines take ZeRO 0/1. A ZeRO-0 bf16 pipeline saves, but DeepSpeed
# cannot resume it (its BF16_Optimizer state), which rigl_ds refuses by name.
RUNS = [(0, "fp32"), (1, "fp32"), (1, "bf16")]
SAVED = RUNS + [(0, "bf16")]
SAVE_AT, STEPS = 3, 6  # updates at steps 0, 2, 4: the resumed run's first update comes after the load
TAG = f"global_step{SAVE_AT}"


def _ids(runs):
    return [f"zero{s}_{d}" for s, d in runs]


@pytest.fixture(scope="module")
def pipeline_checkpoints(tmp_path_factory):
    """Per run: an uninterrupted run to STEPS saving at SAVE_AT, and (RUNS) a run loading that
    checkpoint and going on to STEPS; then a 1-stage engine loading the first run's checkpoint, and a
    ZeRO-0 bf16 pipeline loading its own."""
    base = tmp_path_factory.mktemp("pipeline_checkpoints")
    folders = {key: str(base / f"zero{key[0]}_{key[1]}") for key in SAVED}
    calls = []
    for (stage, dtype), folder in folders.items():
        save = dict(save_at=SAVE_AT, save_dir=folder, watch_save=True)
        calls.append(("train", dict(stage=stage, dtype=dtype, steps=STEPS, **save)))
    for stage, dtype in RUNS:
        calls.append(("train", dict(stage=stage, dtype=dtype, steps=STEPS, load_dir=folders[(stage, dtype)])))
    calls.append(("load_error", dict(stage=0, dtype="fp32", load_dir=folders[(0, "fp32")], num_stages=1)))
    bf16_zero0 = dict(stage=0, dtype="bf16", load_dir=folders[(0, "bf16")], num_stages=2, then_module_only=True)
    calls.append(("load_error", bf16_zero0))
    per_rank = run_gloo(2, "pipe_sim:run_many", calls)
    results = iter(zip(*per_rank))  # per call: each rank's result
    straight = {key: list(next(results)) for key in SAVED}
    resumed = {key: list(next(results)) for key in RUNS}
    runs = {key: {"folder": folders[key], "straight": straight[key], "resumed": resumed.get(key)} for key in SAVED}
    return {"runs": runs, "other_stages": list(next(results)), "bf16_zero0": list(next(results))}


def _by_stage(results):
    out = sorted(results, key=lambda r: r["stage_id"])
    assert [r["stage_id"] for r in out] == [0, 1]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS, ids=_ids(RUNS))
def test_a_pipeline_resumed_from_its_checkpoint_matches_the_uninterrupted_run_bit_for_bit(pipeline_checkpoints, run):
    got = pipeline_checkpoints["runs"][run]
    for straight, resumed in zip(_by_stage(got["straight"]), _by_stage(got["resumed"])):
        stage = straight["stage_id"]
        assert resumed["stage_id"] == stage and resumed["global_steps"] == straight["global_steps"] == STEPS
        saved = straight["masks"][SAVE_AT - 1]
        # The load has teeth: the saved masks are not the ones a fresh engine starts from.
        assert any(not torch.equal(saved[n], m) for n, m in straight["initial"].items()), stage
        assert resumed["initial"].keys() == saved.keys()
        assert all(torch.equal(resumed["initial"][n], m) for n, m in saved.items()), stage  # this stage's own masks
        assert resumed["losses"] == straight["losses"][SAVE_AT:], stage
        for offset, masks in enumerate(resumed["masks"]):
            for name, mask in masks.items():
                assert torch.equal(mask, straight["masks"][SAVE_AT + offset][name]), (stage, offset, name)
        assert resumed["history"] == [h for h in straight["history"] if h[0] >= SAVE_AT] and resumed["history"]
        assert resumed["controller_step"] == straight["controller_step"]
        assert resumed["pool_counts"] == straight["pool_counts"] == resumed["targets"]
        assert not {k: v for viol in resumed["violations"] for k, v in viol.items() if v}
        for name, copies in straight["final"].items():
            for key, value in copies.items():
                assert torch.equal(resumed["final"][name][key], value), (stage, name, key)
            for key, value in straight["optimizer_state"][name].items():
                assert torch.equal(resumed["optimizer_state"][name][key], value), (stage, name, key)


@pytest.mark.slow
@pytest.mark.parametrize("run", SAVED, ids=_ids(SAVED))
def test_a_pipeline_checkpoint_names_rank_files_by_stage_and_records_every_stage_before_latest(
    pipeline_checkpoints, run
):
    got = pipeline_checkpoints["runs"][run]
    tag_dir = os.path.join(got["folder"], TAG)
    folder = os.path.join(tag_dir, "rigl_ds")
    assert sorted(os.listdir(folder)) == ["complete.json", "stage00-rank00000.pt", "stage01-rank00000.pt"]
    record = json.load(open(os.path.join(folder, "complete.json")))
    assert record["num_stages"] == 2 and record["world_size"] == 1
    assert sorted(record["files"]) == ["stage00-rank00000.pt", "stage01-rank00000.pt"]
    for straight in _by_stage(got["straight"]):
        stage = straight["stage_id"]
        saved = torch.load(os.path.join(folder, f"stage{stage:02d}-rank00000.pt"), weights_only=False)
        assert saved["stage"] == stage and saved["num_stages"] == 2
        assert sorted(saved["ranges"]) == sorted(layer["name"] for layer in straight["report"])
        for name, mask in straight["at_save"]["masks"].items():
            assert torch.equal(checkpoint.saved_mask(saved, name), mask.reshape(-1)), (stage, name)
    assert checkpoint.read_latest(got["folder"]) == TAG and checkpoint.is_complete(tag_dir) == (True, "complete")
    # Crash-consistent order across stages: no record when any stage's DeepSpeed save returns, and
    # rank 0 moves `latest` only once every stage's file and the record are in place.
    for rank, straight in enumerate(got["straight"]):
        saved_events = [e for name, e in straight["save_events"] if name == "deepspeed_saved"]
        assert saved_events == [{"latest": False, "record": False}], rank
        latest_events = [e for name, e in straight["save_events"] if name == "write_latest"]
        assert latest_events == ([(True, "complete")] if rank == 0 else []), rank


@pytest.mark.slow
def test_a_missing_stage_file_makes_a_pipeline_checkpoint_incomplete_naming_it(pipeline_checkpoints, tmp_path):
    from rigl_ds.export import export

    got = pipeline_checkpoints["runs"][RUNS[0]]
    save_dir = str(tmp_path / "ckpt")
    shutil.copytree(got["folder"], save_dir)
    tag_dir = os.path.join(save_dir, TAG)
    assert checkpoint.is_complete(tag_dir)[0]
    os.remove(os.path.join(tag_dir, "rigl_ds", "stage01-rank00000.pt"))
    complete, reason = checkpoint.is_complete(tag_dir)
    assert not complete and "stage01-rank00000.pt is missing" in reason
    assert checkpoint.newest_complete(save_dir) == (None, [(TAG, reason)])
    stage0 = _by_stage(got["straight"])[0]
    ranges = {n: (0, m.numel()) for n, m in stage0["at_save"]["masks"].items()}
    # Stage 0's own file is there: the checkpoint is refused all the same.
    for load in (
        lambda: checkpoint.load_rank_state(tag_dir, 0, ranges, stage=0, num_stages=2),
        lambda: checkpoint.whole_masks(os.path.join(tag_dir, "rigl_ds")),
        lambda: export(save_dir, str(tmp_path / "export")),
    ):
        with pytest.raises(IncompleteCheckpointError, match="stage01-rank00000.pt is missing"):
            load()


@pytest.mark.slow
@pytest.mark.parametrize("run", SAVED, ids=_ids(SAVED))
def test_export_assembles_every_stages_layers_of_a_pipeline_checkpoint(pipeline_checkpoints, run, tmp_path):
    from safetensors.torch import load_file

    from rigl_ds.export import main as export_main

    got = pipeline_checkpoints["runs"][run]
    out = str(tmp_path / "export")
    export_main([got["folder"], out])
    weights, masks = load_file(f"{out}/model.safetensors"), load_file(f"{out}/masks.safetensors")
    report = json.load(open(f"{out}/sparsity_report.json"))
    stages = _by_stage(got["straight"])
    want_masks = {n: m for s in stages for n, m in s["at_save"]["masks"].items()}
    want_weights = {n: w["fp32"] for s in stages for n, w in s["at_save"]["weights"].items()}
    assert sorted(masks) == sorted(want_masks) and len(want_masks) == len(pipe_sim.WIDTHS)
    assert sorted(weights) == sorted(want_weights)  # every parameter of every stage, biases too
    for name, mask in want_masks.items():
        assert torch.equal(masks[name].bool().reshape(-1), mask), name
    for name, value in want_weights.items():
        assert weights[name].dtype == torch.float32 and torch.equal(weights[name], value), name
    assert [layer["name"] for layer in report["layers"]] == sorted(want_masks, key=lambda n: int(n.split(".")[0]))
    assert report["active_entries"] == sum(int(m.sum()) for m in want_masks.values())


@pytest.mark.slow
def test_an_engine_with_another_number_of_stages_refuses_the_checkpoint_before_loading_anything(
    pipeline_checkpoints,
):
    for rank, refused in enumerate(pipeline_checkpoints["other_stages"]):
        error = refused["error"]
        assert error is not None and error["type"] == "CheckpointLayoutError", (rank, error)
        assert "saved by a pipeline of 2 stages" in error["message"], error["message"]
        assert "this run: an engine that is not pipelined" in error["message"], error["message"]
        assert refused["weights_unchanged"] and refused["steps"] == 0


@pytest.mark.slow
def test_a_zero0_bf16_pipeline_is_refused_a_resume_by_name_and_loads_weights_and_masks_alone(pipeline_checkpoints):
    saved = {r["stage_id"]: r["at_save"] for r in pipeline_checkpoints["runs"][(0, "bf16")]["straight"]}
    for refused in pipeline_checkpoints["bf16_zero0"]:
        error = refused["error"]
        assert error is not None and error["type"] == "NotImplementedError", error
        assert "bf16 at zero_optimization.stage 0 cannot resume" in error["message"], error["message"]
        assert "load_module_only=True" in error["message"]
        assert refused["weights_unchanged"] and refused["steps"] == 0
        # What does work: the weights (the module's bf16 copy) and this stage's masks.
        at_save, loaded = saved[refused["stage_id"]], refused["module_only"]
        assert loaded["masks"].keys() == at_save["masks"].keys()
        for name, mask in at_save["masks"].items():
            assert torch.equal(loaded["masks"][name], mask), name
        for name, copies in at_save["weights"].items():
            assert torch.equal(loaded["weights"][name]["low_precision"], copies["low_precision"]), name


# -- the format, with the collectives stood in for ------------------------------------------------

STAGE_SHAPES = [{"0.weight": (6, 5), "2.weight": (7,)}, {"4.weight": (11,)}]  # each stage's masked layers


def _whole(stage):
    g = torch.Generator().manual_seed(stage)
    shapes = STAGE_SHAPES[stage]
    masks = {n: torch.rand(math.prod(s), generator=g) < 0.3 for n, s in shapes.items()}
    ema = {n: torch.randn(math.prod(s), generator=g) for n, s in shapes.items()}
    return masks, ema


def _ranges(stage, world, rank):
    """ZeRO-3's cut of the stage's layers over its data-parallel ranks."""
    out = {}
    for name, shape in STAGE_SHAPES[stage].items():
        numel = math.prod(shape)
        part = -(-numel // world)
        offset = min(rank * part, numel)
        out[name] = (offset, min(part, numel - offset))
    return out


def _state(stage, world, rank):
    masks, ema = _whole(stage)
    ranges = _ranges(stage, world, rank)
    return {
        "step": 7,
        "last_update": 6,
        "config": {"sparsity": 0.7},
        "masks": {n: masks[n][o : o + k].clone() for n, (o, k) in ranges.items()},
        "pool_counts": torch.tensor([int(m.sum()) for m in masks.values()]),
        "method_state": {f"grad_ema.{n}": ema[n][o : o + k].clone() for n, (o, k) in ranges.items()},
    }


def save_pipeline(save_dir, tag, world, num_stages=2, fail=None):
    """``checkpoint.save`` as every process of a ``num_stages`` x ``world`` job in turn (global rank
    stage * world + rank; global rank 0 last, getting every report). ``fail``: the rank file whose
    write fails. Returns each process's CheckpointWriteError (or None)."""
    processes = [(s, r) for s in range(num_stages) for r in range(world)]
    reports, current, errors = {}, {"rank": 0}, {}

    def gather(obj):
        if "entry" in obj:
            reports[current["rank"]] = obj
            if current["rank"] == 0:
                return [reports[g] for g in sorted(reports)]
        return [obj]

    original_write = checkpoint.write_rank_file

    def write(path, state):
        if fail is not None and os.path.basename(path) == fail:
            raise OSError(28, "No space left on device")
        return original_write(path, state)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "global_rank", lambda: current["rank"])
        mp.setattr(checkpoint, "_all_gather", gather)
        mp.setattr(checkpoint, "write_rank_file", write)
        for g in list(range(1, len(processes))) + [0]:
            stage, rank = processes[g]
            current["rank"] = g
            try:
                checkpoint.save(
                    str(save_dir),
                    tag,
                    _state(stage, world, rank),
                    ranges=_ranges(stage, world, rank),
                    shapes=STAGE_SHAPES[stage],
                    rank=rank,
                    world_size=world,
                    stage=stage,
                    num_stages=num_stages,
                )
                errors[g] = None
            except CheckpointWriteError as exc:
                errors[g] = exc
    return errors


def test_the_record_of_a_pipeline_save_lists_every_stage_and_is_not_written_when_one_stage_fails(tmp_path):
    assert not any(save_pipeline(tmp_path, "step4", world=2).values())
    folder = tmp_path / "step4" / "rigl_ds"
    record = json.loads((folder / "complete.json").read_text())
    files = ["stage00-rank00000.pt", "stage00-rank00001.pt", "stage01-rank00000.pt", "stage01-rank00001.pt"]
    assert record["num_stages"] == 2 and record["world_size"] == 2 and sorted(record["files"]) == files
    assert checkpoint.read_latest(str(tmp_path)) == "step4" and checkpoint.is_complete(str(folder.parent))[0]

    errors = save_pipeline(tmp_path, "step6", world=2, fail="stage01-rank00001.pt")
    assert errors[3] is not None  # the failing process (stage 1, data-parallel rank 1)
    assert "stage01-rank00001.pt" in str(errors[0]) and "No space left" in str(errors[0])  # rank 0 saw it
    assert not (tmp_path / "step6" / "rigl_ds" / "complete.json").exists()
    assert checkpoint.read_latest(str(tmp_path)) == "step4"
    tag, skipped = checkpoint.newest_complete(str(tmp_path))
    assert tag == "step4" and [t for t, _ in skipped] == ["step6"]


def test_a_pipeline_save_cut_short_before_its_record_is_reported_unfinished(tmp_path):
    save_pipeline(tmp_path, "step4", world=2)
    os.remove(tmp_path / "step4" / "rigl_ds" / "complete.json")
    complete, reason = checkpoint.is_complete(str(tmp_path / "step4"))
    assert not complete and "complete.json is missing: the save of this checkpoint did not finish" in reason


@pytest.mark.parametrize("loaded", [1, 2, 3])
def test_each_stage_reads_only_its_own_files_and_reslices_onto_another_data_parallel_world_size(tmp_path, loaded):
    save_pipeline(tmp_path, "step4", world=2)
    tag_dir = str(tmp_path / "step4")
    for stage in range(2):
        masks, ema = _whole(stage)
        for rank in range(loaded):
            ranges = _ranges(stage, loaded, rank)
            state = checkpoint.load_rank_state(tag_dir, rank, ranges, stage=stage, num_stages=2)
            assert state["step"] == 7 and sorted(state["masks"]) == sorted(STAGE_SHAPES[stage])
            assert torch.equal(state["pool_counts"], _state(stage, 2, 0)["pool_counts"])  # this stage's pools
            for name, (offset, numel) in ranges.items():
                assert torch.equal(state["masks"][name], masks[name][offset : offset + numel]), (stage, rank, name)
                got = state["method_state"].get(f"grad_ema.{name}", torch.zeros(0))
                assert torch.equal(got, ema[name][offset : offset + numel]), (stage, rank, name)
    whole = checkpoint.whole_masks(os.path.join(tag_dir, "rigl_ds"))
    want = {n: (m, STAGE_SHAPES[s][n]) for s in range(2) for n, m in _whole(s)[0].items()}
    assert sorted(whole) == sorted(want)
    for name, (mask, shape) in want.items():
        assert whole[name].shape == torch.Size(shape) and torch.equal(whole[name].reshape(-1), mask)


def test_another_number_of_stages_or_another_cut_into_stages_is_refused_by_name(tmp_path):
    save_pipeline(tmp_path / "pipe", "step4", world=1)
    tag_dir = str(tmp_path / "pipe" / "step4")
    with pytest.raises(CheckpointLayoutError, match=r"a pipeline of 2 stages \(this run: a pipeline of 3 stages\)"):
        checkpoint.load_rank_state(tag_dir, 0, _ranges(0, 1, 0), stage=0, num_stages=3)
    with pytest.raises(CheckpointLayoutError, match=r"a pipeline of 2 stages \(this run: an engine that is not pip"):
        checkpoint.load_rank_state(tag_dir, 0, _ranges(0, 1, 0))
    # The same number of stages, with the layers cut differently: stage 0 now holding stage 1's layer.
    with pytest.raises(CheckpointLayoutError, match=r"stage00-rank00000\.pt holds the masks of \['0.weight', '2"):
        checkpoint.load_rank_state(tag_dir, 0, {**_ranges(0, 1, 0), **_ranges(1, 1, 0)}, stage=0, num_stages=2)
    # A checkpoint of an engine that was not pipelined, loaded by a pipeline.
    flat = dict(ranges=_ranges(0, 1, 0), shapes=STAGE_SHAPES[0], rank=0, world_size=1)
    checkpoint.save(str(tmp_path / "flat"), "step4", _state(0, 1, 0), **flat)
    assert sorted(os.listdir(tmp_path / "flat" / "step4" / "rigl_ds")) == ["complete.json", "rank00000.pt"]
    with pytest.raises(CheckpointLayoutError, match=r"saved by an engine that is not pipelined \(this run: a pipel"):
        checkpoint.load_rank_state(str(tmp_path / "flat" / "step4"), 0, _ranges(0, 1, 0), stage=0, num_stages=2)
