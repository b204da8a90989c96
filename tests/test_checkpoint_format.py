"""The per-rank rigl_ds checkpoint format (rigl_ds.checkpoint): a save is complete only once every
rank file and its completeness record are in place, ``latest`` moves only after that, and a reader
at any world size refuses a missing, truncated or unrecorded file by name."""

import hashlib
import json
import logging
import math
import os

import pytest
import torch

from rigl_ds import bits, checkpoint
from rigl_ds.checkpoint import CheckpointWriteError, IncompleteCheckpointError

SHAPES = {"h.0.weight": (6, 5), "h.1.weight": (11,)}


def _whole():
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(math.prod(s), generator=g) < 0.3 for n, s in SHAPES.items()}
    ema = {n: torch.randn(math.prod(s), generator=g) for n, s in SHAPES.items()}
    return masks, ema


def ranges_for(world, rank):
    """ZeRO-3's cut: ceil(numel / world) entries a rank, the last ranks short or empty."""
    out = {}
    for name, shape in SHAPES.items():
        numel = math.prod(shape)
        part = -(-numel // world)
        offset = min(rank * part, numel)
        out[name] = (offset, min(part, numel - offset))
    return out


def fake_state(world, rank, packed=True):
    """A rank's state as ``SparseController.state_dict`` makes it: each mask range as packed bits with
    its entries in "mask_numel" (format 3), or with ``packed=False`` as a bool tensor (formats 1, 2)."""
    masks, ema = _whole()
    ranges = ranges_for(world, rank)
    state = {
        "step": 7,
        "last_update": 6,
        "skipped_updates": 0,
        "updates": 3,
        "config": {"sparsity": 0.7},
        "masks": {n: masks[n][o : o + k].clone() for n, (o, k) in ranges.items()},
        "pool_counts": torch.tensor([int(m.sum()) for m in masks.values()]),
        "method_state": {f"grad_ema.{n}": ema[n][o : o + k].clone() for n, (o, k) in ranges.items()},
    }
    if packed:
        state["masks"] = {n: bits.pack(m) for n, m in state["masks"].items()}
        state["mask_numel"] = {n: k for n, (_, k) in ranges.items()}
    return state


def assert_packed(state, ranges):
    """Every mask of ``state`` is uint8 packed bits of ceil(numel / 8) bytes, padding bits zero."""
    assert state["mask_numel"] == {n: k for n, (_, k) in ranges.items()}
    for name, (_, numel) in ranges.items():
        m = state["masks"][name]
        assert m.dtype == torch.uint8 and m.shape == (math.ceil(numel / 8),), name
        assert int(bits.count(m)) == int(checkpoint.saved_mask(state, name).sum()), name  # no stray padding bit


def save_world(save_dir, tag, world, save_latest=True, save_deepspeed=None, packed=True):
    """``checkpoint.save`` as each of ``world`` ranks in turn (ranks 1.. write their files, then rank
    0 gets every rank's report), with the collectives stood in for."""
    reports, current = {}, {"rank": 0}

    def gather(obj):
        if "entry" in obj:
            reports[current["rank"]] = obj
            if current["rank"] == 0:
                return [reports[r] for r in sorted(reports)]
        return [obj]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "global_rank", lambda: current["rank"])
        mp.setattr(checkpoint, "_all_gather", gather)
        for rank in list(range(1, world)) + [0]:
            current["rank"] = rank
            checkpoint.save(
                str(save_dir),
                tag,
                fake_state(world, rank, packed),
                ranges=ranges_for(world, rank),
                shapes=SHAPES,
                rank=rank,
                world_size=world,
                save_latest=save_latest,
                save_deepspeed=save_deepspeed,
            )
    return os.path.join(str(save_dir), tag)


def test_a_save_round_trips_and_records_every_rank_file_with_its_size_and_sha256(tmp_path):
    tag_dir = save_world(tmp_path, "step7", world=2)
    folder = os.path.join(tag_dir, "rigl_ds")
    record = json.load(open(os.path.join(folder, "complete.json")))
    assert record["world_size"] == 2 and sorted(record["files"]) == ["rank00000.pt", "rank00001.pt"]
    for name, entry in record["files"].items():
        data = open(os.path.join(folder, name), "rb").read()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not [f for f in os.listdir(folder) if ".tmp." in f]
    assert checkpoint.read_latest(str(tmp_path)) == "step7"
    assert checkpoint.is_complete(tag_dir) == (True, "complete")
    for rank in (0, 1):
        want, got = fake_state(2, rank), checkpoint.load_rank_state(tag_dir, rank, ranges_for(2, rank))
        assert got["step"] == 7 and got["world_size"] == 2 and got["format"] == checkpoint.FORMAT == 3
        assert_packed(got, ranges_for(2, rank))
        for name in SHAPES:
            assert torch.equal(got["masks"][name], want["masks"][name])
            assert torch.equal(got["method_state"][f"grad_ema.{name}"], want["method_state"][f"grad_ema.{name}"])


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "bool"])
@pytest.mark.parametrize("saved,loaded", [(2, 1), (2, 4), (2, 3), (3, 2), (4, 3), (4, 1), (1, 4), (3, 5)])
def test_a_checkpoint_reslices_onto_another_world_size(tmp_path, saved, loaded, packed):
    """Ranges of 30 and 11 entries cut at most world sizes off byte boundaries (15, 3, 6, 9, ...): the
    bits are re-cut exactly. A resliced state keeps its files' mask format (bool for older files)."""
    tag_dir = save_world(tmp_path, "step7", world=saved, packed=packed)
    masks, ema = _whole()
    for rank in range(loaded):
        ranges = ranges_for(loaded, rank)
        state = checkpoint.load_rank_state(tag_dir, rank, ranges)
        assert state["step"] == 7 and state["last_update"] == 6 and state["ranges"] == ranges
        if packed:
            assert_packed(state, ranges)
        else:
            assert "mask_numel" not in state and all(m.dtype == torch.bool for m in state["masks"].values())
        for name, (offset, numel) in ranges.items():
            assert torch.equal(checkpoint.saved_mask(state, name), masks[name][offset : offset + numel])
            ema_state = state["method_state"].get(f"grad_ema.{name}", torch.zeros(0))
            assert torch.equal(ema_state, ema[name][offset : offset + numel])
    whole = checkpoint.whole_masks(os.path.join(tag_dir, "rigl_ds"))
    assert {n: m.shape for n, m in whole.items()} == {n: torch.Size(s) for n, s in SHAPES.items()}
    assert all(torch.equal(whole[n].reshape(-1), masks[n]) for n in SHAPES)


def test_a_truncated_rank_file_is_refused_naming_it(tmp_path):
    tag_dir = save_world(tmp_path, "step7", world=2)
    victim = os.path.join(tag_dir, "rigl_ds", "rank00001.pt")
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 2])
    for load in (
        lambda: checkpoint.load_rank_state(tag_dir, 0, ranges_for(2, 0)),  # even a rank that would not read it
        lambda: checkpoint.load_rank_state(tag_dir, 0, ranges_for(1, 0)),
        lambda: checkpoint.whole_masks(os.path.join(tag_dir, "rigl_ds")),
    ):
        with pytest.raises(IncompleteCheckpointError, match="rank00001.pt.*truncated"):
            load()
    complete, reason = checkpoint.is_complete(tag_dir)
    assert not complete and "rank00001.pt" in reason


def test_a_rank_file_changed_at_the_same_size_is_refused_by_its_checksum(tmp_path):
    tag_dir = save_world(tmp_path, "step7", world=2)
    victim = os.path.join(tag_dir, "rigl_ds", "rank00000.pt")
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    with pytest.raises(IncompleteCheckpointError, match="rank00000.pt: sha256"):
        checkpoint.load_rank_state(tag_dir, 0, ranges_for(2, 0))
    assert checkpoint.is_complete(tag_dir, checksums=False)[0]  # sizes alone cannot tell
    complete, reason = checkpoint.is_complete(tag_dir)
    assert not complete and "rank00000.pt" in reason


def test_a_missing_rank_file_is_refused_naming_it(tmp_path):
    tag_dir = save_world(tmp_path, "step7", world=3)
    os.remove(os.path.join(tag_dir, "rigl_ds", "rank00002.pt"))
    with pytest.raises(IncompleteCheckpointError, match="rank00002.pt is missing"):
        checkpoint.load_rank_state(tag_dir, 0, ranges_for(3, 0))
    assert "rank00002.pt" in checkpoint.is_complete(tag_dir)[1]


def test_a_new_style_checkpoint_without_its_completeness_record_is_refused(tmp_path):
    tag_dir = save_world(tmp_path, "step7", world=2)
    os.remove(os.path.join(tag_dir, "rigl_ds", "complete.json"))
    with pytest.raises(IncompleteCheckpointError, match="complete.json is missing"):
        checkpoint.load_rank_state(tag_dir, 0, ranges_for(2, 0))
    complete, reason = checkpoint.is_complete(tag_dir)
    assert not complete and "complete.json" in reason


def _legacy(tmp_path, world):
    """A checkpoint as rigl_ds wrote it before completeness records: plain torch.save, no "format"."""
    folder = tmp_path / "global_step7" / "rigl_ds"
    folder.mkdir(parents=True)
    for rank in range(world):
        state = fake_state(world, rank, packed=False)
        state.update(ranges=ranges_for(world, rank), shapes=SHAPES, world_size=world)
        torch.save(state, folder / f"rank{rank:05d}.pt")
    return str(tmp_path / "global_step7")


def test_a_format_2_checkpoint_of_bool_masks_loads_at_every_world_size(tmp_path, monkeypatch):
    """Written as rigl_ds did before packed masks (format 2, complete.json, bool tensors): still loads,
    resliced exactly, and a controller takes its masks."""
    monkeypatch.setattr(checkpoint, "FORMAT", 2)
    tag_dir = save_world(tmp_path, "step7", world=2, packed=False)
    monkeypatch.undo()
    masks, _ = _whole()
    for loaded in (1, 2, 4):
        for rank in range(loaded):
            ranges = ranges_for(loaded, rank)
            state = checkpoint.load_rank_state(tag_dir, rank, ranges)
            assert state["format"] == 2 and "mask_numel" not in state
            for name, (offset, numel) in ranges.items():
                assert torch.equal(checkpoint.saved_mask(state, name), masks[name][offset : offset + numel])
                packed, n = checkpoint.saved_mask_bits(state, name)
                assert n == numel and torch.equal(bits.unpack(packed, n), masks[name][offset : offset + numel])
    whole = checkpoint.whole_masks(os.path.join(tag_dir, "rigl_ds"))
    assert all(torch.equal(whole[n].reshape(-1), masks[n]) for n in SHAPES)


def test_saved_mask_readers_refuse_packed_bits_without_their_entries_or_of_the_wrong_size():
    state = fake_state(1, 0)
    name = "h.0.weight"
    del state["mask_numel"]
    with pytest.raises(ValueError, match="h.0.weight.*mask_numel"):
        checkpoint.saved_mask(state, name)
    state = fake_state(1, 0)
    state["mask_numel"][name] = 31  # 4 bytes hold 30 or 31 entries: 41 needs 6
    assert checkpoint.saved_mask_numel(state, name) == 31
    state["mask_numel"][name] = 41
    with pytest.raises(ValueError, match="41 saved entries need 6 bytes, got 4"):
        checkpoint.saved_mask(state, name)


def test_a_legacy_checkpoint_loads_with_a_warning_when_every_rank_file_does(tmp_path, caplog):
    tag_dir = _legacy(tmp_path, 2)
    with caplog.at_level(logging.WARNING, logger="rigl_ds"):
        state = checkpoint.load_rank_state(tag_dir, 0, ranges_for(1, 0))
    assert "no complete.json" in caplog.text
    masks, _ = _whole()
    assert all(torch.equal(state["masks"][n], masks[n]) for n in SHAPES)
    assert checkpoint.is_complete(tag_dir)[0]


def test_a_legacy_checkpoint_missing_a_rank_file_is_refused(tmp_path):
    tag_dir = _legacy(tmp_path, 3)
    os.remove(os.path.join(tag_dir, "rigl_ds", "rank00001.pt"))
    with pytest.raises(IncompleteCheckpointError, match="rank00001.pt is missing"):
        checkpoint.load_rank_state(tag_dir, 0, ranges_for(3, 0))


def test_latest_does_not_move_when_the_rigl_ds_write_fails(tmp_path, monkeypatch):
    save_world(tmp_path, "step4", world=2)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError, match="rank00000.pt.*No space left"):
        checkpoint.save(
            str(tmp_path), "step6", fake_state(1, 0), ranges=ranges_for(1, 0), shapes=SHAPES, rank=0, world_size=1
        )
    monkeypatch.undo()
    assert checkpoint.read_latest(str(tmp_path)) == "step4"
    folder = tmp_path / "step6" / "rigl_ds"
    assert not (folder / "complete.json").exists() and not [f for f in os.listdir(folder) if ".tmp." in f]
    tag, skipped = checkpoint.newest_complete(str(tmp_path))
    assert tag == "step4" and [s[0] for s in skipped] == ["step6"]


def test_latest_moves_only_after_the_record_and_a_resave_first_drops_the_old_record(tmp_path, monkeypatch):
    seen = []
    record = tmp_path / "step7" / "rigl_ds" / "complete.json"
    original = checkpoint.write_latest
    monkeypatch.setattr(checkpoint, "write_latest", lambda d, t: (seen.append(record.exists()), original(d, t)))
    save_world(tmp_path, "step7", world=2)
    assert seen == [True]
    # Saving the same tag again: while DeepSpeed writes, the old record no longer vouches for the tag.
    during = []
    save_world(tmp_path, "step7", world=1, save_deepspeed=lambda: during.append(record.exists()))
    assert during == [False] and checkpoint.is_complete(str(tmp_path / "step7"))[0]
    assert json.loads(record.read_text())["world_size"] == 1


def test_save_latest_false_leaves_latest_alone(tmp_path):
    save_world(tmp_path, "step4", world=1)
    save_world(tmp_path, "step6", world=1, save_latest=False)
    assert checkpoint.read_latest(str(tmp_path)) == "step4"
    assert checkpoint.is_complete(str(tmp_path / "step6"))[0]


def test_resume_picks_the_newest_complete_checkpoint_and_pruning_keeps_it(tmp_path):
    from rigl_ds.lm.train import CHECKPOINT_TAG, _prune_checkpoints

    for step in (1, 2, 4, 6):
        save_world(tmp_path, f"step{step}", world=2)
    os.remove(tmp_path / "step1" / "rigl_ds" / "complete.json")  # an old crashed save
    os.remove(tmp_path / "step6" / "rigl_ds" / "rank00001.pt")  # the newest save was cut short
    tag, skipped = checkpoint.newest_complete(str(tmp_path), pattern=CHECKPOINT_TAG)
    assert tag == "step4" and [t for t, _ in skipped] == ["step6"] and "rank00001.pt" in skipped[0][1]
    _prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step4", "step6"]


@pytest.mark.slow
def test_deepspeed_save_and_load_round_trip_bit_identically_with_latest_written_last(tmp_path):
    from gloo import run_gloo

    folder = str(tmp_path / "ckpt")
    ranks = run_gloo(2, "ckpt_sim:save_then_load", folder)
    tag_dir = os.path.join(folder, "global_step3")
    for rank, out in enumerate(ranks):
        deepspeed_saved = [e for name, e in out["events"] if name == "deepspeed_saved"]
        assert deepspeed_saved == [{"latest": False, "record": False}]  # DeepSpeed no longer writes 'latest'
        if rank == 0:
            assert [e for name, e in out["events"] if name == "write_latest"] == [(True, "complete")]
        straight, resumed = out["straight"], out["resumed"]
        for name, mask in straight["masks"][2].items():
            assert torch.equal(resumed["masks_at_load"][name], mask)
        assert resumed["history"] == straight["history"][2:]
        for name, mask in straight["masks"][-1].items():
            assert torch.equal(resumed["masks"][-1][name], mask)
            for key, value in straight["final"][name].items():
                assert torch.equal(resumed["final"][name][key], value), (name, key)
    record = json.load(open(os.path.join(tag_dir, "rigl_ds", "complete.json")))
    assert record["world_size"] == 2 and sorted(record["files"]) == ["rank00000.pt", "rank00001.pt"]
    assert "mp_rank_00_model_states.pt" in record["deepspeed_files"]
    assert checkpoint.read_latest(folder) == "global_step3" and checkpoint.is_complete(tag_dir)[0]
    latest = os.stat(os.path.join(folder, "latest")).st_mtime_ns
    assert all(os.stat(os.path.join(tag_dir, f)).st_mtime_ns <= latest for f in record["deepspeed_files"])
    assert os.stat(os.path.join(tag_dir, "rigl_ds", "complete.json")).st_mtime_ns <= latest


# -- the controller's state: what a rank file holds -------------------------------------------------
CONTROLLER_BLOCK = {"method": "rigl", "sparsity": 0.8, "delta_t": 3, "end_step": 30}


def _trained_controller(steps=5):
    from helpers import make, task, train_step

    model, opt, sparse = make(CONTROLLER_BLOCK, total_steps=40)
    x, y = task()
    for _ in range(steps):
        train_step(model, opt, sparse, x, y)
    return model, opt, sparse


def test_the_controller_saves_each_mask_as_packed_bits_and_loads_them_back():
    from helpers import make

    _, _, sparse = _trained_controller()
    state = sparse.state_dict()
    shards = sparse.controller.shards
    assert set(state["masks"]) == set(state["mask_numel"]) == {s.layer.name for s in shards}
    for s in shards:
        saved = state["masks"][s.layer.name]
        assert saved.dtype == torch.uint8 and saved.shape == (math.ceil(s.numel / 8),)
        assert state["mask_numel"][s.layer.name] == s.numel
        assert torch.equal(saved, s.mask_bits) and saved.data_ptr() != s.mask_bits.data_ptr()  # a copy
        assert torch.equal(bits.unpack(saved, s.numel), sparse.masks[s.layer.name].reshape(-1))
    _, _, fresh = make(CONTROLLER_BLOCK, total_steps=40)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.masks[n], m) for n, m in sparse.masks.items())
    assert fresh.controller.step == 5


def test_the_controller_loads_a_state_of_bool_masks_as_saved_before_packed_bits():
    """An older state: "masks" of bool tensors, no "mask_numel". It loads to the same masks, and
    training then goes on exactly as from the packed state."""
    import copy

    from helpers import make, task, train_step

    model, opt, sparse = _trained_controller()
    packed = sparse.state_dict()
    old = copy.deepcopy(packed)
    old["masks"] = {s.layer.name: s.mask.clone() for s in sparse.controller.shards}
    del old["mask_numel"]
    x, y = task()
    runs = []
    for state in (packed, old):
        m2, o2, s2 = make(CONTROLLER_BLOCK, total_steps=40)
        m2.load_state_dict(model.state_dict())
        o2.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch would share the moment tensors
        s2.load_state_dict(state)
        assert all(torch.equal(s2.masks[n], m) for n, m in sparse.masks.items())
        losses = [train_step(m2, o2, s2, x, y) for _ in range(8)]  # across the updates at steps 6, 9, 12
        runs.append((losses, s2.masks))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])


@pytest.mark.parametrize("loaded", [1, 2, 4, 5])
def test_a_controller_state_saved_whole_reslices_bit_exactly_and_loads_back(tmp_path, loaded):
    """A real controller's packed masks through checkpoint.save, read at other world sizes (ranges of
    922 entries at 5 ranks: off byte boundaries), and back whole into a fresh controller."""
    from helpers import make

    _, _, sparse = _trained_controller()
    shards = sparse.controller.shards
    shapes = {s.layer.name: tuple(s.layer.shape) for s in shards}
    whole_ranges = {s.layer.name: (0, s.numel) for s in shards}
    state = sparse.state_dict()
    checkpoint.save(str(tmp_path), "step5", state, ranges=whole_ranges, shapes=shapes, rank=0, world_size=1)
    tag_dir = str(tmp_path / "step5")
    pieces = {n: [] for n in shapes}
    for rank in range(loaded):
        ranges = {}
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = -(-numel // loaded)
            offset = min(rank * part, numel)
            ranges[name] = (offset, min(part, numel - offset))
        state = checkpoint.load_rank_state(tag_dir, rank, ranges)
        assert_packed(state, ranges)
        for name in shapes:
            pieces[name].append(checkpoint.saved_mask(state, name))
    for name, mask in sparse.masks.items():
        assert torch.equal(torch.cat(pieces[name]), mask.reshape(-1)), name
    whole = checkpoint.whole_masks(os.path.join(tag_dir, "rigl_ds"))
    assert all(torch.equal(whole[n], m) for n, m in sparse.masks.items())
    _, _, fresh = make(CONTROLLER_BLOCK, total_steps=40)
    fresh.load_state_dict(checkpoint.load_rank_state(tag_dir, 0, whole_ranges))
    assert all(torch.equal(fresh.masks[n], m) for n, m in sparse.masks.items())
