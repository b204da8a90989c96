"""The per-rank rigl_ds checkpoint format: written, verified, read at any world size and
assembled whole by this module alone.

Layout, inside a checkpoint's tag folder (beside DeepSpeed's own files)::

    <tag>/rigl_ds/rank00000.pt ...   one state file per saving rank (masks and method state of its
                                     ranges, plus "ranges", "shapes", "world_size", "format")
    <tag>/rigl_ds/stage01-rank00000.pt ...
                                     the same, named by the rank's full coordinates (pipeline stage,
                                     data-parallel rank) when the engine is pipelined: every stage
                                     repeats the data-parallel ranks (plus "stage", "num_stages")
    <tag>/rigl_ds/complete.json      the completeness record: world size (data-parallel, per stage),
                                     number of pipeline stages (pipelined engines only), each rank
                                     file's size and sha256, and DeepSpeed's files with their sizes

Each rank file's ``"masks"`` holds, per layer, the mask of the rank's range [offset, offset + numel)
as its packed bits (format 3): a uint8 tensor of ``ceil(numel / 8)`` bytes, entry ``i`` at bit
``i % 8`` of byte ``i // 8`` (``rigl_ds.bits.pack``, padding bits zero), with ``"mask_numel"``
(layer name -> numel) to unpack it. Formats 1 and 2 saved a bool tensor of ``numel`` entries per
layer and no ``"mask_numel"``; every reader here (and ``SparseController.load_state_dict``) takes
either, per tensor by its dtype (``saved_mask_bits``, ``saved_mask_range``, ``saved_mask``).

Saves are crash-consistent: each file is written under a temporary name, fsync'd and renamed into
place; ``complete.json`` is written only once every rank's file (and DeepSpeed's) is in place, of
every pipeline stage, and ``<save_dir>/latest`` moves to the tag only after that. A checkpoint
without the record is one whose save did not finish, unless it predates the record (legacy:
accepted, with a warning, when every rank file its world size names exists and loads).

Pure torch + torch.distributed: the DeepSpeed save is handed in as a callable.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from . import bits, faults

logger = logging.getLogger("rigl_ds")

# 1: rank files only (before the completeness record); 2: with complete.json; 3: masks saved as
# packed bits with "mask_numel" (bool tensors before). Readers take all three.
FORMAT = 3
RECORDED = 2  # the first format written with complete.json
FOLDER = "rigl_ds"
RECORD = "complete.json"
LATEST = "latest"

Ranges = Mapping[str, Tuple[int, int]]  # layer name -> (offset, numel) of the flattened weight


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint whose rigl_ds part is missing, unfinished or damaged; the message names the file."""


class CheckpointWriteError(RuntimeError):
    """A save that failed on some rank: no completeness record and no ``latest`` were written."""


class CheckpointLayoutError(ValueError):
    """A complete checkpoint this run cannot read: saved by a pipeline of another number of stages (or
    none), or with the layers cut into stages differently. The message names both layouts."""


def rank_file(rank: int, stage: Optional[int] = None) -> str:
    """A rank file's name: its data-parallel rank, after its pipeline stage when the engine is pipelined
    (``stage`` None: not pipelined, the names of checkpoints saved before pipelines were supported)."""
    return f"rank{rank:05d}.pt" if stage is None else f"stage{stage:02d}-rank{rank:05d}.pt"


def rank_files(world_size: int, num_stages: Optional[int] = None) -> List[str]:
    """Every rank file of a save, stage by stage, then in data-parallel rank order."""
    if num_stages is None:
        return [rank_file(r) for r in range(world_size)]
    return [rank_file(r, s) for s in range(num_stages) for r in range(world_size)]


def _describe(num_stages: Optional[int]) -> str:
    return "an engine that is not pipelined" if num_stages is None else f"a pipeline of {num_stages} stages"


def rigl_folder(tag_dir: str) -> str:
    """Where a tag's rigl_ds state lives. ``ds_to_universal`` writes ``<tag>_universal`` beside the
    original and does not copy our folder: its state is the original's."""
    folder = os.path.join(tag_dir, FOLDER)
    if not os.path.isdir(folder) and tag_dir.rstrip(os.sep).endswith("_universal"):
        folder = os.path.join(tag_dir.rstrip(os.sep).removesuffix("_universal"), FOLDER)
    return folder


# -- writing ---------------------------------------------------------------------------------------
def save(
    save_dir: str,
    tag: str,
    state: Dict[str, Any],
    *,
    ranges: Ranges,
    shapes: Mapping[str, Tuple[int, ...]],
    rank: int,
    world_size: int,
    writes: bool = True,
    save_latest: bool = True,
    save_deepspeed: Optional[Callable[[], Any]] = None,
    record_deepspeed_files: bool = True,
    stage: Optional[int] = None,
    num_stages: Optional[int] = None,
) -> Any:
    """Saves this rank's state under ``<save_dir>/<tag>/rigl_ds`` in the order that makes the
    checkpoint crash-consistent; collective (every process of the default group calls it).

    1. rank 0 drops an old completeness record of the same tag (a re-save must not look complete
       halfway); 2. ``save_deepspeed()`` (DeepSpeed's save, told not to write ``latest``);
    3. each writing rank's file, atomically; 4. once every process reports, rank 0 writes
    ``complete.json`` atomically; 5. with ``save_latest``, rank 0 then points ``latest`` at the tag.
    A failure on any rank stops every rank with ``CheckpointWriteError`` before steps 4/5.

    ``rank`` / ``world_size`` are the saved layout's (the data-parallel group's, within the stage);
    ``stage`` / ``num_stages`` this process's pipeline stage and the pipeline's length (None when not
    pipelined): the record then waits for every stage's files. ``writes`` is False on processes
    holding a replica another process writes (ZeRO-0). Returns what ``save_deepspeed`` returned."""
    if (stage is None) != (num_stages is None) or (stage is not None and not 0 <= stage < num_stages):
        raise ValueError(
            f"checkpoint.save: stage {stage}, num_stages {num_stages}: give both (0 <= stage < num_stages) or neither"
        )
    tag = str(tag)
    tag_dir = os.path.join(save_dir, tag)
    folder = os.path.join(tag_dir, FOLDER)
    error = None
    if global_rank() == 0:
        error = _attempt(lambda: _remove(os.path.join(folder, RECORD)))
    out = save_deepspeed() if save_deepspeed is not None else None
    faults.maybe_fail("mid-save", state.get("step"))  # DeepSpeed's files written, ours not yet

    entry: Optional[Dict[str, Any]] = None
    if writes and error is None:
        payload = dict(state)
        payload.update(
            ranges=dict(ranges), shapes={k: tuple(v) for k, v in shapes.items()}, world_size=world_size, format=FORMAT
        )
        if num_stages is not None:
            payload.update(stage=stage, num_stages=num_stages)
        name = rank_file(rank, stage)
        try:
            os.makedirs(folder, exist_ok=True)
            entry = {"file": name, **write_rank_file(os.path.join(folder, name), payload)}
        except Exception as exc:  # reported to every rank below, then raised there
            error = f"{os.path.join(folder, name)}: {exc!r}"
    # Over the whole job (every pipeline stage): the record below waits for every stage's files.
    reports = _all_gather({"entry": entry, "error": error})
    _raise_failures(reports, "writing the rigl_ds rank files", tag_dir)

    error = None
    if global_rank() == 0:
        entries = [r["entry"] for r in reports if r["entry"] is not None]
        error = _attempt(lambda: _write_record(tag_dir, tag, world_size, entries, record_deepspeed_files, num_stages))
    _raise_failures(_all_gather({"error": error}), "writing the completeness record", tag_dir)

    if save_latest:
        error = _attempt(lambda: write_latest(save_dir, tag)) if global_rank() == 0 else None
        _raise_failures(_all_gather({"error": error}), f"writing {os.path.join(save_dir, LATEST)}", tag_dir)
    return out


def write_rank_file(path: str, state: Dict[str, Any]) -> Dict[str, Any]:
    """``torch.save`` to a temporary name in the same folder, fsync, rename into place. Returns the
    file's size and sha256 as written."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        entry = {"bytes": os.path.getsize(tmp), "sha256": _sha256(tmp)}
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path))
    return entry


def write_latest(save_dir: str, tag: str) -> None:
    """``<save_dir>/latest`` names ``tag``, replaced atomically (a reader sees the old tag or the new)."""
    _write_atomic(os.path.join(save_dir, LATEST), str(tag).encode())


def _write_record(
    tag_dir: str,
    tag: str,
    world_size: int,
    entries: List[Dict[str, Any]],
    record_deepspeed_files: bool,
    num_stages: Optional[int] = None,
) -> None:
    files: Dict[str, Dict[str, Any]] = {}
    for e in entries:
        info = {"bytes": e["bytes"], "sha256": e["sha256"]}
        if e["file"] in files and files[e["file"]] != info:
            raise CheckpointWriteError(f"two processes wrote {e['file']} with different contents")
        files[e["file"]] = info
    expected = set(rank_files(world_size, num_stages))
    if set(files) != expected:
        raise CheckpointWriteError(
            f"the saving ranks wrote {sorted(files)}, expected {sorted(expected)} for world size {world_size}"
            + ("" if num_stages is None else f" and {num_stages} pipeline stages")
        )
    record: Dict[str, Any] = {"format": FORMAT, "tag": tag, "world_size": world_size, "files": files}
    if num_stages is not None:  # absent for an engine that is not pipelined, as before pipelines were supported
        record["num_stages"] = num_stages
    # DeepSpeed's files, as they stand after its save returned on every rank: made durable here and
    # listed, so that ``is_complete`` can tell when one has since gone missing or been cut short.
    record["deepspeed_files"] = _deepspeed_files(tag_dir, fsync=True) if record_deepspeed_files else None
    _write_atomic(os.path.join(tag_dir, FOLDER, RECORD), json.dumps(record, indent=1, sort_keys=True).encode())


def _deepspeed_files(tag_dir: str, fsync: bool = False) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for root, dirs, names in os.walk(tag_dir):
        if os.path.abspath(root) == os.path.abspath(tag_dir):
            dirs[:] = [d for d in dirs if d != FOLDER]
        for name in names:
            path = os.path.join(root, name)
            if fsync:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            out[os.path.relpath(path, tag_dir)] = os.path.getsize(path)
    return out


# -- verifying -------------------------------------------------------------------------------------
@dataclass
class Manifest:
    """A verified rigl_ds folder: its rank files in (stage, rank) order, with their recorded size and
    sha256 (None for a legacy checkpoint). ``num_stages``: None unless a pipeline saved it."""

    folder: str
    world_size: int
    files: List[str]
    entries: Dict[str, Optional[Dict[str, Any]]] = field(default_factory=dict)
    deepspeed_files: Optional[Dict[str, int]] = None
    legacy: bool = False
    num_stages: Optional[int] = None

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def stage_files(self, stage: Optional[int]) -> List[str]:
        """One pipeline stage's rank files in rank order (every file when ``stage`` is None)."""
        if stage is None:
            return list(self.files)
        if self.num_stages is None or not 0 <= stage < self.num_stages:
            raise CheckpointLayoutError(f"{self.folder} was saved by {_describe(self.num_stages)}: no stage {stage}")
        return [rank_file(r, stage) for r in range(self.world_size)]


def verify(folder: str, checksums: bool = False) -> Manifest:
    """The folder's manifest, once it is known complete: its record present and every rank file there
    at its recorded size (and sha256, with ``checksums``). Raises ``IncompleteCheckpointError``
    naming the first file that is missing or wrong."""
    if not os.path.isdir(folder):
        raise IncompleteCheckpointError(f"{folder} does not exist: the checkpoint holds no rigl_ds state")
    record_path = os.path.join(folder, RECORD)
    if not os.path.isfile(record_path):
        return _verify_legacy(folder)
    try:
        with open(record_path) as f:
            record = json.load(f)
        world_size, entries = int(record["world_size"]), record["files"]
        num_stages = None if record.get("num_stages") is None else int(record["num_stages"])
    except (ValueError, KeyError, TypeError) as exc:
        raise IncompleteCheckpointError(f"{record_path} is unreadable: {exc}") from None
    files = rank_files(world_size, num_stages)
    for name in files:
        path = os.path.join(folder, name)
        if name not in entries:
            stages = "" if num_stages is None else f", {num_stages} pipeline stages"
            raise IncompleteCheckpointError(f"{record_path} does not list {name} (world size {world_size}{stages})")
        if not os.path.isfile(path):
            raise IncompleteCheckpointError(f"{path} is missing (listed in {record_path})")
        size = os.path.getsize(path)
        if size != entries[name]["bytes"]:
            raise IncompleteCheckpointError(
                f"{path} has {size} bytes, the completeness record says {entries[name]['bytes']}: truncated or replaced"
            )
        if checksums and _sha256(path) != entries[name]["sha256"]:
            raise IncompleteCheckpointError(f"{path}: sha256 differs from the completeness record's")
    return Manifest(
        folder, world_size, files, {n: entries[n] for n in files}, record.get("deepspeed_files"), num_stages=num_stages
    )


def _verify_legacy(folder: str) -> Manifest:
    """Written before completeness records: accept only if every rank file the saved world size
    names exists and loads. A format-2 rank file without a record is an unfinished save."""
    present = sorted(f for f in os.listdir(folder) if re.fullmatch(r"(stage\d{2,}-)?rank\d{5}\.pt", f))
    if not present:
        raise IncompleteCheckpointError(f"{folder} holds neither {RECORD} nor any rank file: the save did not finish")
    first = _load_file(os.path.join(folder, present[0]), None)
    if int(first.get("format", 1)) >= RECORDED:
        raise IncompleteCheckpointError(
            f"{os.path.join(folder, RECORD)} is missing: the save of this checkpoint did not finish"
        )
    world_size = int(first.get("world_size", len(present)))
    files = [rank_file(r) for r in range(world_size)]
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise IncompleteCheckpointError(f"{path} is missing (legacy checkpoint of world size {world_size})")
        if name != present[0]:
            _load_file(path, None)
    logger.warning(
        "rigl_ds: %s has no %s (saved before completeness records); accepting it because all %d rank files load",
        folder,
        RECORD,
        world_size,
    )
    return Manifest(folder, world_size, files, {n: None for n in files}, legacy=True)


def is_complete(tag_dir: str, checksums: bool = True) -> Tuple[bool, str]:
    """Whether a checkpoint's save finished: its rigl_ds record, rank files (sizes, and sha256 with
    ``checksums``) and DeepSpeed's files as the record lists them. Returns (complete, reason)."""
    if not os.path.isdir(tag_dir):
        return False, f"{tag_dir} does not exist"
    folder = rigl_folder(tag_dir)
    try:
        manifest = verify(folder, checksums=checksums)
    except IncompleteCheckpointError as exc:
        return False, str(exc)
    if manifest.legacy:
        return True, f"legacy checkpoint (no {RECORD}); all {manifest.world_size} rank files load"
    base = os.path.dirname(folder)
    for name, size in (manifest.deepspeed_files or {}).items():
        path = os.path.join(base, name)
        if not os.path.isfile(path):
            return False, f"{path} is missing (listed in {os.path.join(folder, RECORD)})"
        if os.path.getsize(path) != size:
            return False, f"{path} has {os.path.getsize(path)} bytes, the completeness record says {size}"
    return True, "complete"


def newest_complete(
    save_dir: str, pattern: Optional[str] = None, checksums: bool = True
) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """The newest complete checkpoint under ``save_dir`` (tags ordered by their last number, then
    modification time; ``pattern``: a regex the tag must match whole), and the newer tags skipped on
    the way with the reason each is incomplete. (None, skipped) when none is complete."""
    skipped: List[Tuple[str, str]] = []
    for tag in checkpoint_tags(save_dir, pattern):
        ok, reason = is_complete(os.path.join(save_dir, tag), checksums=checksums)
        if ok:
            return tag, skipped
        skipped.append((tag, reason))
    return None, skipped


def checkpoint_tags(save_dir: str, pattern: Optional[str] = None) -> List[str]:
    """Tag folders under ``save_dir``, newest first."""
    if not os.path.isdir(save_dir):
        return []

    def order(tag: str) -> Tuple[int, float]:
        numbers = re.findall(r"\d+", tag)
        return (int(numbers[-1]) if numbers else -1, os.path.getmtime(os.path.join(save_dir, tag)))

    tags = [
        d
        for d in os.listdir(save_dir)
        if os.path.isdir(os.path.join(save_dir, d)) and (pattern is None or re.fullmatch(pattern, d))
    ]
    return sorted(tags, key=order, reverse=True)


def read_latest(save_dir: str) -> Optional[str]:
    path = os.path.join(save_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


# -- reading ---------------------------------------------------------------------------------------
def load_rank_state(
    tag_dir: str, rank: int, ranges: Ranges, stage: Optional[int] = None, num_stages: Optional[int] = None
) -> Dict[str, Any]:
    """The state for a process holding ``ranges`` as saving rank ``rank`` of pipeline stage ``stage``
    (None: not pipelined) would: its own file when the saved ranges are the same, else cut from every
    file of its stage (another data-parallel world size or layout). Verifies completeness first (every
    stage's files), and the sha256 of every file it reads. Raises ``CheckpointLayoutError`` when the
    checkpoint was saved by another number of pipeline stages, or its stage holds other layers."""
    manifest = verify(rigl_folder(tag_dir))
    if manifest.num_stages != num_stages:
        # Each stage's file holds the masks, pool counts and method state of the layers that stage
        # held; DeepSpeed's optimizer state is per stage too. Another cut has no file to read.
        raise CheckpointLayoutError(
            f"{tag_dir} was saved by {_describe(manifest.num_stages)} (this run: {_describe(num_stages)}); "
            "rigl_ds loads a pipeline checkpoint only with the number of pipeline stages it was saved with"
        )
    ranges = {k: tuple(v) for k, v in ranges.items()}
    files = manifest.stage_files(stage)
    name = rank_file(rank, stage) if rank < manifest.world_size else files[0]
    state = _load_file(manifest.path(name), manifest.entries[name])
    saved = {k: tuple(v) for k, v in state.get("ranges", {}).items()}
    if stage is not None and set(saved) != set(ranges):
        raise CheckpointLayoutError(
            f"{manifest.path(name)} holds the masks of {sorted(saved)}, this run's pipeline stage {stage} masks "
            f"{sorted(ranges)}: the model is cut into stages differently from the saved run (or rigl.modules changed)"
        )
    if saved == ranges:
        return state
    return reslice(manifest, ranges, state, stage=stage)


def iter_rank_states(manifest: Manifest, stage: Optional[int] = None) -> Iterator[Dict[str, Any]]:
    """Every saved rank's state in (stage, rank) order, or one pipeline stage's, one in memory at a
    time, each checked against the record."""
    for name in manifest.stage_files(stage):
        yield _load_file(manifest.path(name), manifest.entries[name])


def reslice(
    manifest: Manifest, ranges: Ranges, template: Dict[str, Any], stage: Optional[int] = None
) -> Dict[str, Any]:
    """Masks and per-entry method state for ``ranges``, cut from every saved rank's ranges (of
    pipeline stage ``stage``, which alone holds those layers); the rest of the state (step, counts,
    config) from ``template``. The masks come in the format the files hold (``template``'s): packed
    bits, assembled bit-exactly at any offset one saved range at a time; bool for older files."""
    packed = "mask_numel" in template
    if packed:
        masks = {name: torch.zeros(bits.packed_numel(numel), dtype=torch.uint8) for name, (_, numel) in ranges.items()}
    else:
        masks = {name: torch.zeros(numel, dtype=torch.bool) for name, (_, numel) in ranges.items()}
    method: Dict[str, torch.Tensor] = {}
    for saved in iter_rank_states(manifest, stage):
        for name, (offset, want) in ranges.items():
            start, numel = saved["ranges"][name]
            lo, hi = max(start, offset), min(start + numel, offset + want)
            if lo >= hi:
                continue
            if packed:
                _copy_bits(masks[name], lo - offset, saved, name, lo - start, hi - lo)
            else:
                masks[name][lo - offset : hi - offset] = saved_mask_range(saved, name, lo - start, hi - lo)
            for key, value in saved["method_state"].items():
                # Per-entry method state is keyed "<what>.<layer>" and has one value per saved entry.
                if key.endswith("." + name) and value.numel() == numel:
                    dest = method.setdefault(key, torch.zeros(want, dtype=value.dtype))
                    dest[lo - offset : hi - offset] = value[lo - start : hi - start]
    state = dict(template)
    state["masks"] = masks
    if packed:
        state["mask_numel"] = {name: numel for name, (_, numel) in ranges.items()}
    state["method_state"] = method
    state["ranges"] = dict(ranges)
    return state


def whole_masks(folder: str) -> Dict[str, torch.Tensor]:
    """Every masked layer's whole mask (bool), shaped like its weight, from a verified rigl_ds folder
    (of every pipeline stage: each stage's files hold its own layers). Assembled as packed bits, one
    file in memory at a time, and unpacked layer by layer at the end."""
    packed: Dict[str, torch.Tensor] = {}
    covered: Dict[str, List[Tuple[int, int]]] = {}
    shapes: Dict[str, Tuple[int, ...]] = {}
    for saved in iter_rank_states(verify(folder)):
        for name, (start, numel) in saved["ranges"].items():
            if name not in packed:
                shapes[name] = tuple(saved["shapes"][name])
                packed[name] = torch.zeros(bits.packed_numel(int(torch.Size(shapes[name]).numel())), dtype=torch.uint8)
                covered[name] = []
            if numel:
                _copy_bits(packed[name], start, saved, name, 0, numel)
                covered[name].append((start, start + numel))
    gaps = [n for n, spans in covered.items() if not _covers(spans, int(torch.Size(shapes[n]).numel()))]
    if gaps:
        raise IncompleteCheckpointError(f"{folder}: the saved ranks do not cover every entry of {gaps[:5]}")
    out: Dict[str, torch.Tensor] = {}
    for name in list(packed):
        size = int(torch.Size(shapes[name]).numel())
        out[name] = bits.unpack(packed.pop(name), size).clone().view(shapes[name])
    return out


def _covers(spans: List[Tuple[int, int]], size: int) -> bool:
    reached = 0
    for lo, hi in sorted(spans):
        if lo > reached:
            return False
        reached = max(reached, hi)
    return reached >= size


# -- masks inside a saved state: packed bits (format 3) or bool (formats 1 and 2) --------------------
def _saved_mask(state: Mapping[str, Any], name: str) -> Tuple[torch.Tensor, int]:
    """``name``'s saved mask, flat, and its number of entries: uint8 packed bits, or bool."""
    mask = state["masks"][name]
    if mask.dtype == torch.bool:
        return mask.reshape(-1), mask.numel()
    numel = state.get("mask_numel", {}).get(name)
    if mask.dtype != torch.uint8 or numel is None:
        got = f"{mask.dtype}" + ("" if numel is not None else ", and the state has no mask_numel for it")
        raise ValueError(f"{name}: a saved mask is bool, or uint8 bits with its entries in mask_numel; got {got}")
    numel = int(numel)
    if mask.numel() != bits.packed_numel(numel):
        raise ValueError(f"{name}: {numel} saved entries need {bits.packed_numel(numel)} bytes, got {mask.numel()}")
    return mask.reshape(-1), numel


def saved_mask_numel(state: Mapping[str, Any], name: str) -> int:
    """Entries of ``name``'s mask in a saved state (the range the saving process held)."""
    return _saved_mask(state, name)[1]


def saved_mask_bits(state: Mapping[str, Any], name: str) -> Tuple[torch.Tensor, int]:
    """``name``'s saved mask as packed bits (a new tensor, padding bits zero) and its entries, from
    either format: a bool mask (formats 1, 2) is packed here, one layer at a time."""
    mask, numel = _saved_mask(state, name)
    if mask.dtype == torch.bool:
        return bits.pack(mask), numel
    out = mask.clone()
    if numel % 8:
        out[-1] &= (1 << (numel % 8)) - 1
    return out, numel


def saved_mask_range(state: Mapping[str, Any], name: str, start: int, numel: int) -> torch.Tensor:
    """Entries [start, start + numel) of ``name``'s saved mask (counted from the start of the saved
    range) as a bool tensor, unpacking only the bytes they live in."""
    mask, total = _saved_mask(state, name)
    if start < 0 or numel < 0 or start + numel > total:
        raise ValueError(f"{name}: entries [{start}, {start + numel}) outside the saved mask's {total}")
    if mask.dtype == torch.bool:
        return mask[start : start + numel]
    return bits.unpack_range(mask, start, numel)


def saved_mask(state: Mapping[str, Any], name: str) -> torch.Tensor:
    """``name``'s whole saved mask as a flat bool tensor, from either format."""
    return saved_mask_range(state, name, 0, saved_mask_numel(state, name))


def _copy_bits(dest: torch.Tensor, at: int, state: Mapping[str, Any], name: str, start: int, numel: int) -> None:
    """Writes entries [start, start + numel) of ``name``'s saved mask into the packed bits ``dest`` at
    entries [at, at + numel): whole bytes copied where both sides are byte-aligned, the rest (and any
    unaligned range) through a bool tensor of that range alone."""
    mask, _ = _saved_mask(state, name)
    if mask.dtype == torch.uint8 and at % 8 == 0 and start % 8 == 0:
        whole = numel // 8
        dest[at // 8 : at // 8 + whole] = mask[start // 8 : start // 8 + whole]
        at, start, numel = at + whole * 8, start + whole * 8, numel - whole * 8
    if numel == 0:
        return
    values = saved_mask_range(state, name, start, numel)
    first, last = at // 8, (at + numel + 7) // 8
    span = bits.unpack(dest[first:last], (last - first) * 8)  # a new tensor: the bytes written into
    span[at - first * 8 : at - first * 8 + numel] = values
    dest[first:last] = bits.pack(span)


def _load_file(path: str, entry: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise IncompleteCheckpointError(f"{path} is missing")
    with open(path, "rb") as f:
        data = f.read()
    if entry is not None:
        if len(data) != entry["bytes"]:
            raise IncompleteCheckpointError(
                f"{path} has {len(data)} bytes, the completeness record says {entry['bytes']}: truncated or replaced"
            )
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise IncompleteCheckpointError(f"{path}: sha256 differs from the completeness record's")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise IncompleteCheckpointError(f"{path} does not load (truncated or damaged): {exc}") from None


# -- files and collectives -------------------------------------------------------------------------
def _tmp_name(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp.{os.getpid()}")


def _write_atomic(path: str, data: bytes) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    """Makes a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _attempt(fn: Callable[[], Any]) -> Optional[str]:
    """``fn()``; its failure as a string to hand every rank (so none waits on a rank that failed)."""
    try:
        fn()
    except Exception as exc:
        return repr(exc)
    return None


def _raise_failures(reports: List[Dict[str, Any]], what: str, tag_dir: str) -> None:
    failed = [(r, rep["error"]) for r, rep in enumerate(reports) if rep.get("error")]
    if failed:
        detail = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise CheckpointWriteError(
            f"saving {tag_dir} failed while {what} ({detail}); the checkpoint is incomplete and 'latest' was not moved"
        )


def global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_gather(obj: Any) -> List[Any]:
    """Every process's ``obj`` in rank order; also the barrier between the save's steps."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
