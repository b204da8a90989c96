"""Render a run folder of ``launch/train_lm.py`` to PNG: loss curves and a per-layer sparsity picture.

    python -m rigl_ds.lm.plot runs/cpu_char_gru_rigl [more run folders, drawn on the same axes]

Writes ``loss.png`` (training loss and validation loss against optimizer steps, training FLOPs
spent against dense, and the exploration metrics: ITOP rate and mean fan-in CV) and
``sparsity.png`` (each masked layer's density, active / entries) into the first folder, or into
``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Dict, List, Sequence


def read_metrics(run: Path) -> List[Dict[str, float]]:
    path = Path(run) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a train_lm run folder, or it logged nothing yet")
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def plot_runs(runs: Sequence[Path], out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, (ax_loss, ax_flops, ax_explore) = plt.subplots(1, 3, figsize=(16, 4))
    for run in runs:
        rows = read_metrics(run)
        label = Path(run).name
        steps = [r["step"] for r in rows]
        line = ax_loss.plot(steps, [r["loss"] for r in rows], label=f"{label} train")[0]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if val:
            ax_loss.plot(*zip(*val), "o--", color=line.get_color(), label=f"{label} validation")
        ax_flops.plot(steps, [r["training_flops_vs_dense"] for r in rows], color=line.get_color(), label=label)
        explored = [(r["step"], r["itop_rate"], r.get("fan_in_cv_mean")) for r in rows if "itop_rate" in r]
        if explored:
            at = [e[0] for e in explored]
            ax_explore.plot(at, [e[1] for e in explored], color=line.get_color(), label=f"{label} ITOP")
            if all(e[2] is not None for e in explored):
                ax_explore.plot(at, [e[2] for e in explored], ":", color=line.get_color(), label=f"{label} fan-in CV")
    ax_loss.set(xlabel="optimizer step", ylabel="loss (nats / token)", title="Loss")
    ax_flops.set(
        xlabel="optimizer step", ylabel="training FLOPs so far / dense", title="Training FLOPs", ylim=(0, 1.05)
    )
    ax_explore.set(
        xlabel="optimizer step",
        ylabel="fraction / coefficient",
        title="Exploration: ITOP rate (solid), fan-in CV (dotted)",
    )
    for ax in (ax_loss, ax_flops, ax_explore):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    written = [out / "loss.png"]
    fig.savefig(written[0], dpi=110)
    plt.close(fig)

    layers_path = Path(runs[0]) / "layers.json"
    layers = json.loads(layers_path.read_text()) if layers_path.is_file() else []
    if layers:
        names = [r["name"].removesuffix(".weight") for r in layers]
        density = [r["active"] / r["numel"] for r in layers]
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(layers) + 1.5))
        bars = ax.barh(range(len(layers)), density, color="tab:blue")
        ax.set_yticks(range(len(layers)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel="density (active / entries)", xlim=(0, 1), title=f"Per-layer density: {Path(runs[0]).name}")
        for bar, r in zip(bars, layers):
            ax.text(
                bar.get_width() + 0.01,
                bar.get_y() + bar.get_height() / 2,
                f"{r['active']}/{r['numel']}",
                va="center",
                fontsize=6,
            )
        fig.tight_layout()
        written.append(out / "sparsity.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (job.out_dir)")
    p.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default: the first run folder)")
    args = p.parse_args(argv)
    for path in plot_runs(args.runs, args.out or args.runs[0]):
        print(path)


if __name__ == "__main__":
    main()
