"""The main job, launch/train_lm.py: every shipped config is valid, each model family trains under
the deepspeed launcher, logs and checkpoints land in the run folder, a resumed run equals an
uninterrupted one, and the plot command renders the run."""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rigl_ds.config import load_config
from rigl_ds.lm.job import JobConfigError, load_job

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.json"))
SCRIPT = ROOT / "launch" / "train_lm.py"
TINY_GPT2 = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32, "resid_pdrop": 0.1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(tmp_path: Path, config: dict, *extra: str, ranks: int = 1, name: str = "run") -> Path:
    """Starts launch/train_lm.py as users do (the deepspeed launcher for several ranks, plain python
    for one) and returns the run folder."""
    out = tmp_path / name
    config = json.loads(json.dumps(config))
    config["job"]["out_dir"] = str(out)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "PYTHONUNBUFFERED": "1"}
    if ranks == 1:
        cmd = [sys.executable, str(SCRIPT)]
    else:
        launcher = Path(sys.executable).with_name("deepspeed")
        cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(_free_port()), str(SCRIPT)]
    done = subprocess.run(
        [*cmd, "--deepspeed_config", str(path), *extra], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out


def metrics(run: Path):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def tiny(config_name: str, **job) -> dict:
    config = json.loads((ROOT / "configs" / config_name).read_text())
    config["job"].update(job)
    return config


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_validates(path):
    config = json.loads(path.read_text())
    if "rigl" in config or "job" not in config:  # a DeepSpeed config with the block, or a bare block
        load_config(config)
    if "job" in config:
        job = load_job(config["job"])
        assert job.out_dir.startswith("runs/")


@pytest.mark.parametrize(
    "block,key",
    [
        ({"steps": 0}, "job.steps"),
        ({"family": "bert"}, "job.family"),
        ({"optimizer": "lion"}, "job.optimizer"),
        ({"seq_len": 1}, "job.seq_len"),
        ({"stepz": 10}, "job.stepz"),
    ],
)
def test_bad_job_values_are_rejected_naming_the_key(block, key):
    with pytest.raises(JobConfigError, match=key.replace(".", r"\.")):
        load_job(block)


def test_job_overrides_parse_json_values_and_name_bad_ones():
    job = load_job({"steps": 5}, ["steps=7", 'model={"hidden": 8}', "out_dir=runs/x"])
    assert (job.steps, job.model, job.out_dir) == (7, {"hidden": 8}, "runs/x")
    with pytest.raises(JobConfigError, match="KEY=VALUE"):
        load_job({}, ["steps"])


def test_a_bad_rigl_block_stops_the_job_before_training(tmp_path):
    config = tiny("cpu_char_gru_rigl.json", steps=2)
    config["rigl"]["sparsity"] = 1.5
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--deepspeed_config", str(path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0 and "rigl.sparsity" in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_default_char_gru_job_logs_evaluates_checkpoints_and_plots(tmp_path):
    from matplotlib.image import imread

    from rigl_ds.lm.plot import plot_runs

    config = tiny("cpu_char_gru_rigl.json", steps=40, log_every=10, eval_every=20, save_every=20, eval_blocks=32)
    config["rigl"].update(delta_t=10)
    config["tensorboard"] = {"enabled": True, "output_path": str(tmp_path / "tb"), "job_name": "gru"}
    run = run_job(tmp_path, config)
    rows = metrics(run)
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]) - 0.3  # a char model leaves uniform quickly
    assert [bool(r["val_loss"]) for r in rows] == [False, True, False, True]
    assert abs(float(rows[-1]["val_bits_per_char"]) - float(rows[-1]["val_loss"]) / 0.6931471805599453) < 0.05
    assert all(0.0 < float(r["training_flops_vs_dense"]) < 0.2 for r in rows)  # 90% ERK: about 0.12
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mask_updates"] == 4  # steps 0, 10, 20, 30 (end_fraction 0.75 of 40)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step20", "step40"]
    assert (run / "checkpoints" / "latest").read_text() == "step40"
    events = list((tmp_path / "tb").rglob("events.out.tfevents*"))
    assert events and b"Train/rigl_ds/loss" in events[0].read_bytes()
    for png in plot_runs([run], run):
        image = imread(png)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


@pytest.mark.slow
def test_llama_and_word_lstm_train_sparse_with_exact_counts(tmp_path):
    from rigl_ds.layers import find_sparse_weights, global_shape
    from rigl_ds.lm.data import load_text, train_tokenizer
    from rigl_ds.lm.models import build_model
    from rigl_ds.plan import build_plan

    for name, sizes in (
        ("cpu_llama_rigl.json", {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64}),
        ("cpu_word_lstm_rigl.json", {"hidden": 32, "layers": 1}),
    ):
        config = tiny(name, steps=6, log_every=3, eval_every=6, eval_blocks=8, vocab_size=512, seq_len=16)
        config["job"]["model"].update(sizes)
        config["rigl"].update(delta_t=2)
        run = run_job(tmp_path, config, name=Path(name).stem)
        summary = json.loads((run / "summary.json").read_text())
        # The reference: the plan's exact targets for this model, computed in this process.
        job = load_job(config["job"])
        tok = train_tokenizer(load_text()["train"], job.tokenizer_kind, job.vocab_size, tmp_path / "cache")
        model = build_model(job.family, len(tok), **job.model)
        rigl = load_config(config["rigl"])
        weights = find_sparse_weights(model, rigl.modules)
        plan = build_plan(rigl, {n: global_shape(p) for n, p in weights.items()})
        targets = plan.targets(rigl.sparsity).tolist()
        per_layer = [sum(targets[p] for p in layer.pools) for layer in plan.layers]  # mask groups: pools per layer
        assert [r["active"] for r in summary["layers"]] == per_layer, name
        assert summary["mask_updates"] == 3  # steps 0, 2, 4 (end: 0.75 of 6)
        assert all(math.isfinite(float(r["loss"])) for r in metrics(run))


@pytest.mark.slow
def test_two_ranks_resumed_from_a_checkpoint_equal_an_uninterrupted_run(tmp_path):
    """ZeRO-3 GPT-2 with dropout on 2 ranks under the deepspeed launcher: 6 steps straight against
    3 steps, stop, and --resume to 6. Masks, weights and logged losses are bit-identical."""
    config = tiny(
        "cpu_gpt2_rigl.json",
        steps=6,
        log_every=1,
        eval_every=6,
        eval_blocks=8,
        vocab_size=300,
        seq_len=16,
        save_every=3,
        model=TINY_GPT2,
    )
    config["train_micro_batch_size_per_gpu"] = 2
    config["rigl"].pop("end_fraction")
    config["rigl"].update(delta_t=2, end_step=6)  # not from job.steps, which the first leg sets to 3
    straight = run_job(tmp_path, config, ranks=2, name="straight")
    config["job"]["steps"] = 3
    first = run_job(tmp_path, config, ranks=2, name="resumed")
    assert (first / "checkpoints" / "step3").is_dir()
    config["job"]["steps"] = 6
    resumed = run_job(tmp_path, config, "--resume", ranks=2, name="resumed")

    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in b] == [str(s) for s in range(1, 7)]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    for rank in (0, 1):
        ma = torch.load(straight / "checkpoints/step6/rigl_ds" / f"rank{rank:05d}.pt", weights_only=False)
        mb = torch.load(resumed / "checkpoints/step6/rigl_ds" / f"rank{rank:05d}.pt", weights_only=False)
        assert ma["masks"].keys() == mb["masks"].keys()
        for name in ma["masks"]:
            assert torch.equal(ma["masks"][name], mb["masks"][name]), name
        opt = f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        if not (straight / "checkpoints/step6" / opt).exists():
            opt = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        sa = torch.load(straight / "checkpoints/step6" / opt, weights_only=False)["optimizer_state_dict"]
        sb = torch.load(resumed / "checkpoints/step6" / opt, weights_only=False)["optimizer_state_dict"]
        for x, y in zip(sa["fp32_flat_groups"], sb["fp32_flat_groups"]):
            assert torch.equal(x, y)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (straight, resumed))
    assert sa["layers"] == sb["layers"] and sa["mask_updates"] == sb["mask_updates"] == 3
    assert sa["training_flops_vs_dense"] == pytest.approx(sb["training_flops_vs_dense"], rel=1e-12)


def test_plot_refuses_a_folder_that_is_not_a_run(tmp_path):
    from rigl_ds.lm.plot import plot_runs

    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        plot_runs([tmp_path], tmp_path)
