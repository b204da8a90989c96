"""Quality study: does RigL learn as well as the paper says, at equal steps, on this project's corpus?

Dense, a small dense model with the sparse model's parameter count, static, SET, SNFS, RigL and GMP at
80% and 90% sparsity with ERK and uniform distributions, plus RigL trained 2x longer, each for several
seeds, on two model families: a GPT-style transformer (BPE) and the paper's character-level GRU
(narrowed). Every run trains in one process on the plain-PyTorch path (the same method code as the
DeepSpeed plugin, whose masks are tested equal to it), so no launcher start-up is paid 160 times.

    python bench/quality_study.py                     # the CPU size, two runs at a time: 141 runs, 23 min on 2 cores
    python bench/quality_study.py --size gpu --device cuda --workers 1   # wider models, longer runs
    python bench/quality_study.py --report-only       # rebuild docs/results.md from the results file
    python bench/quality_study.py --study plus        # only the RigL-plus candidates (below)

The RigL-plus part (``--study plus``; ``all``, the default, runs both) trains SET, faithful RigL and
RigL with each candidate option of the ``"rigl"`` block (``VARIANTS``) on the char-GRU and GPT
cells at 90% ERK, at equal steps; its table and plot go to their own section of docs/results.md.
Every sparse run also records its exploration metrics (``rigl_ds.exploration``): the in-time
over-parameterisation rate and the per-layer fan-in spread.

The GPT cell trains 1,000 steps (2.5x the first study's) with a 100-step warm-up and cosine decay of
the learning rate, a 512-token BPE, at 90% ERK only: fewer cells, more steps. With the earlier
2048-token BPE the dense embedding and tied head (262k of the dense model's 675k parameters, dense in
every method) did most of the work at this budget and every 90%-sparse model beat dense, in training
loss as well as in validation (docs/results.md); with 512 tokens the transformer blocks, the part that
is sparsified, carry the model and dense is the upper bound it should be. The char-GRU cells are the
first study's. SET and faithful RigL of the RigL-plus table are the main study's runs of the cell.

Results go to runs/quality/<size>/results.jsonl one line per run as it finishes (a rerun skips runs
already there under the same settings -- each result stores a fingerprint of its family's settings --
so an interrupted study resumes), then to docs/results.md (tables of mean and std of
validation bits per character and perplexity, training FLOPs as a multiple of dense) and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import rigl_ds  # noqa: E402
from rigl_ds.layers import find_sparse_weights  # noqa: E402
from rigl_ds.lm import MASK_GROUPS, build_model, evaluate, lm_blocks, lm_loss, load_text, train_tokenizer  # noqa: E402

GPT_CPU_STEPS, GPT_CPU_LR, GPT_CPU_WARMUP, GPT_CPU_VOCAB = 1000, 2e-3, 100, 512
CELLS = ((0.8, "erk"), (0.8, "uniform"), (0.9, "erk"), (0.9, "uniform"))
SIZES = {
    "cpu": {
        "char_gru": dict(
            sizes=dict(embed=64, hidden=192, readout=(128, 64)),
            width_key="hidden",
            steps=600,
            batch=16,
            seq=64,
            lr=3e-3,
            vocab=None,
        ),
        "gpt": dict(
            sizes=dict(n_layer=2, n_embd=128, n_head=4, n_positions=128),
            width_key="n_embd",
            steps=GPT_CPU_STEPS,
            batch=8,
            seq=64,
            lr=GPT_CPU_LR,
            warmup=GPT_CPU_WARMUP,  # steps of linear LR warm-up, then cosine decay to lr_floor x lr
            lr_floor=0.1,
            # A 512-token BPE: with 2048 the dense embedding and tied head (262k of 675k parameters, dense
            # in every method) carried the model at this budget and 90% sparse blocks beat dense ones.
            vocab=GPT_CPU_VOCAB,
            cells=((0.9, "erk"),),  # (sparsity, distribution) cells this family runs
        ),
        "seeds": 3,
        "eval_blocks": 200,
        "delta_t": 25,
    },
    "gpu": {
        "char_gru": dict(
            sizes=dict(embed=128, hidden=512, readout=(256, 128)),
            width_key="hidden",
            steps=20000,
            batch=64,
            seq=256,
            lr=7e-4,
            vocab=None,
        ),
        "gpt": dict(
            sizes=dict(n_layer=6, n_embd=512, n_head=8, n_positions=512),
            width_key="n_embd",
            steps=20000,
            batch=32,
            seq=256,
            lr=6e-4,
            warmup=500,
            lr_floor=0.1,
            vocab=8192,
        ),
        "seeds": 3,
        "eval_blocks": 2000,
        "delta_t": 100,
    },
}
METHODS = ("static", "set", "snfs", "rigl", "gmp")
ORDER = ("dense", "small_dense", "static", "set", "snfs", "rigl", "gmp", "rigl_2x")

RIGL_PLUS = json.loads((ROOT / "configs" / "rigl_plus.json").read_text())["rigl"]

#: RigL-plus candidates: name -> (method, options merged over the paper defaults). "mask_groups"
#: set to True means the family's own split (rigl_ds.lm.MASK_GROUPS: GRU gates, GPT-2's fused Q/K/V).
VARIANTS = {
    "set": ("set", {}),
    "rigl": ("rigl", {}),
    "rigl+bias": ("rigl", {"grow_bias_correction": "per_entry"}),
    "rigl+warmup": ("rigl", {"grow_warmup_steps": 25}),
    "rigl+groups": ("rigl", {"mask_groups": True}),
    "rigl+fan_in": ("rigl", {"constant_fan_in": True}),
    "rigl+noskip": ("rigl", {"skip_optimizer_step_on_update": False}),
    "rigl+dt50": ("rigl", {"delta_t": 50}),
    "rigl+pool": ("rigl", {"grow_candidate_fraction": 0.5}),
    "rigl+pool0.1": ("rigl", {"grow_candidate_fraction": 0.1}),
    "rigl+fan_in+pool": ("rigl", {"constant_fan_in": True, "grow_candidate_fraction": 0.5}),
    "rigl+fan_in+pool0.1": ("rigl", {"constant_fan_in": True, "grow_candidate_fraction": 0.1}),
    "rigl+fan_in+pool0.1+noskip": (
        "rigl",
        {"constant_fan_in": True, "grow_candidate_fraction": 0.1, "skip_optimizer_step_on_update": False},
    ),
    # N:M masks need M to divide every masked fan-in (64 for the char-GRU), so 90% has no N:M there:
    # the two nearest, 2:16 (87.5%, denser than the cell) and 1:16 (93.75%, sparser).
    "rigl+n_m2:16": ("rigl", {"n_m": [2, 16], "sparsity": 0.875}),
    "rigl+n_m1:16": ("rigl", {"n_m": [1, 16], "sparsity": 0.9375}),
    # The drop fraction (alpha, 0.3 in the paper) and update interval for a 600-1000-step budget.
    "rigl+alpha0.5": ("rigl", {"alpha": 0.5}),
    "rigl+alpha0.1": ("rigl", {"alpha": 0.1}),
    "rigl+dt50+alpha0.5": ("rigl", {"delta_t": 50, "alpha": 0.5}),
    # The recommended block: configs/rigl_plus.json (what won on the char-GRU cell).
    "rigl+plus": ("rigl", {k: v for k, v in RIGL_PLUS.items() if k != "method"}),
    # The recommended block with the family's mask groups (GPT-2: fused Q/K/V as three groups).
    "rigl+plus+groups": ("rigl", {**{k: v for k, v in RIGL_PLUS.items() if k != "method"}, "mask_groups": True}),
}
#: The candidates ``--study all`` (the one-command study) runs; the others with ``--variants``.
DEFAULT_PLUS = (
    "set",
    "rigl",
    "rigl+bias",
    "rigl+groups",
    "rigl+fan_in",
    "rigl+pool0.1",
    "rigl+plus",
    "rigl+plus+groups",
)
PLUS_CELL = (0.9, "erk")


def settings(seeds: int, size: str = "cpu"):
    """Every (family, method, sparsity, distribution, seed) of the main study, in the order they run."""
    for family in ("char_gru", "gpt"):
        cells = SIZES[size][family].get("cells", CELLS)
        for seed in range(seeds):
            yield dict(family=family, method="dense", sparsity=0.0, distribution="-", seed=seed)
            for sparsity in sorted({c[0] for c in cells}):
                yield dict(family=family, method="small_dense", sparsity=sparsity, distribution="-", seed=seed)
                for distribution in [d for s_, d in cells if s_ == sparsity]:
                    for method in (*METHODS, "rigl_2x"):
                        yield dict(
                            family=family, method=method, sparsity=sparsity, distribution=distribution, seed=seed
                        )


def plus_settings(seeds: int, variants=None):
    """The RigL-plus runs: every candidate of ``VARIANTS`` (or the names given) on each family's
    90% ERK cell. SET and faithful RigL there are the main study's runs (the same block, seed and
    data order), not a second copy; dense and small dense come from the main study as the bounds."""
    sparsity, distribution = PLUS_CELL
    for family in ("char_gru", "gpt"):
        for seed in range(seeds):
            for name in variants or VARIANTS:
                run = dict(family=family, method=name, sparsity=sparsity, distribution=distribution, seed=seed)
                yield run if name in MAIN_ALIASES else {**run, "study": "plus"}


#: Plus-study names that are main-study runs (identical blocks).
MAIN_ALIASES = ("set", "rigl")


def spec_id(size: str, family: str) -> str:
    """A short fingerprint of what a family's runs train under (model, data, steps, schedule, mask
    interval, evaluation), stored with each result: a result under other settings is not reused."""
    import hashlib

    config = SIZES[size]
    what = {"family": SIZES[size][family], "delta_t": config["delta_t"], "eval_blocks": config["eval_blocks"]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def current(result: dict, size: str) -> bool:
    """Whether a stored result was trained under the size's present settings (results written
    before fingerprints were stored count as current: move stale ones out by hand)."""
    return result.get("spec") in (None, spec_id(size, result["family"]))


def key(run) -> str:
    study = "plus/" if run.get("study") == "plus" else ""
    return f"{study}{run['family']}/{run['method']}/{run['sparsity']}/{run['distribution']}/{run['seed']}"


def rigl_block(run: dict, common: dict) -> dict:
    """The ``"rigl"`` block of a sparse run: the method's, with a RigL-plus variant's options."""
    if run.get("study") == "plus":
        method, options = VARIANTS[run["method"]]
        options = dict(options)
        if options.get("mask_groups") is True:
            options["mask_groups"] = MASK_GROUPS[_family(run["family"])]
    else:
        method, options = ("rigl" if run["method"] == "rigl_2x" else run["method"]), {}
    block = {"method": method, "sparsity": run["sparsity"], "distribution": run["distribution"], "seed": run["seed"]}
    if rigl_ds.METHODS[method].updates_masks:
        block["delta_t"] = common["delta_t"]
    return {**block, **options}


def small_dense_sizes(family: str, spec: dict, vocab: int, sparsity: float) -> dict:
    """The widest model of the family whose parameter count does not exceed the sparse model's
    (active masked weights plus every dense parameter), found by trying widths."""
    model = build_model(_family(family), vocab, **spec["sizes"])
    masked = sum(p.numel() for p in find_sparse_weights(model, None).values())
    budget = sum(p.numel() for p in model.parameters()) - masked * sparsity
    base = spec["sizes"][spec["width_key"]]
    step = spec["sizes"].get("n_head", 1) if family == "gpt" else 1
    best = step
    for width in range(step, base + 1, step):
        sizes = {**spec["sizes"], spec["width_key"]: width}
        if family == "char_gru":
            sizes["readout"] = tuple(max(1, r * width // base) for r in spec["sizes"]["readout"])
        if sum(p.numel() for p in build_model(_family(family), vocab, **sizes).parameters()) <= budget:
            best = width
    sizes = {**spec["sizes"], spec["width_key"]: best}
    if family == "char_gru":
        sizes["readout"] = tuple(max(1, r * best // base) for r in spec["sizes"]["readout"])
    return sizes


def _family(family: str) -> str:
    return "gpt2" if family == "gpt" else family


def train_one(run: dict, spec: dict, data: dict, common: dict, device: str) -> dict:
    torch.manual_seed(run["seed"])
    vocab = len(data["tokenizer"])
    sizes = spec["sizes"]
    if run["method"] == "small_dense":
        sizes = small_dense_sizes(run["family"], spec, vocab, run["sparsity"])
    model = build_model(_family(run["family"]), vocab, **sizes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    steps = spec["steps"] * (2 if run["method"] == "rigl_2x" else 1)
    schedule = lr_schedule(optimizer, spec, steps)
    sparse = None
    if run["method"] not in ("dense", "small_dense"):
        sparse = rigl_ds.sparsify(model, optimizer, rigl_block(run, common), total_steps=steps)
        probe = data["train"][: spec["batch"]]["input_ids"].to(device)
        sparse.measure_flops(probe, examples=probe.numel())
    step_fn = sparse.step if sparse else optimizer.step
    train = data["train"]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(run["seed"]))
    start = time.time()
    for step in range(steps):
        idx = order[(step * spec["batch"] + torch.arange(spec["batch"])) % len(order)]
        loss = lm_loss(model, train[idx]["input_ids"].to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        step_fn()
        optimizer.zero_grad(set_to_none=True)
        if schedule is not None:
            schedule.step()
    val = evaluate(model, data["validation"], max_blocks=common["eval_blocks"])
    params = sum(p.numel() for p in model.parameters())
    if sparse:
        layers = sparse.layer_report()
        masked = sum(r["numel"] for r in layers)
        params = params - masked + sum(r["active"] for r in layers)
    return {
        **run,
        "steps": steps,
        "params": params,
        "val_loss": val["loss"],
        "perplexity": val["perplexity"],
        "bits_per_char": val["bits_per_char"],
        # Dense training is 1 by definition; small dense is its own dense model (its FLOPs vs the big one).
        "training_flops_vs_dense": sparse.training_flops.multiplier * steps / spec["steps"] if sparse else None,
        "seconds": round(time.time() - start, 1),
        "spec": spec_id(common["size"], run["family"]),
        "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()},
        # Exploration (rigl_ds.exploration): fraction of masked entries ever active, fan-in spread.
        **(sparse.exploration.summary() if sparse else {}),
    }


def lr_schedule(optimizer: torch.optim.Optimizer, spec: dict, steps: int):
    """Linear warm-up over ``spec["warmup"]`` steps, then cosine decay to ``lr_floor`` of the peak;
    None (constant LR, as the char-GRU cells train) when the spec sets no warm-up."""
    import math

    warmup = spec.get("warmup")
    if not warmup:
        return None
    floor = spec.get("lr_floor", 0.0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def prepare(family: str, spec: dict, cache: Path) -> dict:
    text = load_text()
    kind = "char" if family == "char_gru" else "bpe"
    tokenizer = train_tokenizer(text["train"], kind, spec["vocab"] or 0, save_dir=cache)
    return {
        "tokenizer": tokenizer,
        "train": lm_blocks(text["train"], tokenizer, spec["seq"] + 1),
        "validation": lm_blocks(text["validation"], tokenizer, spec["seq"] + 1),
    }


_DATA: dict = {}


def _worker_run(size: str, run: dict, out: Path, device: str, threads: int = 1) -> dict:
    """One run in a worker process (one intra-op thread by default: two single-thread workers get
    more out of two cores than one process with two threads, for models this small)."""
    torch.set_num_threads(threads)
    config = SIZES[size]
    spec = config[run["family"]]
    if run["family"] not in _DATA:
        _DATA[run["family"]] = prepare(run["family"], spec, out / "cache")
    return train_one(run, spec, _DATA[run["family"]], {**config, "size": size}, device)


def run_study(
    size: str,
    out: Path,
    device: str,
    only: str | None,
    workers: int,
    study: str = "all",
    variants=None,
    threads: int = 1,
    methods=None,
    seeds=None,
) -> list:
    import concurrent.futures
    import multiprocessing

    config = SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = {}
    if results_path.is_file():
        for line in results_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if current(r, size):
                    done[key(r)] = r
    wanted = []
    n_seeds = seeds or config["seeds"]
    if study in ("all", "main"):
        wanted += [r for r in settings(n_seeds, size) if methods is None or r["method"] in methods]
    if study in ("all", "plus"):
        wanted += list(plus_settings(n_seeds, variants or (DEFAULT_PLUS if study == "all" else None)))
    wanted = list({key(r): r for r in wanted}.values())  # SET and RigL of the plus study are main runs
    todo = [r for r in wanted if key(r) not in done and (only is None or r["family"] == only)]
    # Longest first (GPT, then the 2x-step runs), so two workers do not end on one long run alone.
    todo.sort(key=lambda r: (r["family"] != "gpt", r["method"] != "rigl_2x"))
    for family in {r["family"] for r in todo}:
        prepare(family, config[family], out / "cache")  # tokenizers and datasets caches, once, before the workers
    context = multiprocessing.get_context("spawn")
    with (
        open(results_path, "a") as f,
        concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool,
        tqdm(total=len(todo), desc="quality study", unit="run") as bar,
    ):
        futures = [pool.submit(_worker_run, size, run, out, device, threads) for run in todo]
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            f.write(json.dumps(result) + "\n")
            f.flush()
            done[key(result)] = result
            bar.set_postfix_str(key(result))
            bar.update(1)
    return list(done.values())


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(runs: list, field: str, digits: int = 3) -> str:
    """Mean over the runs that recorded ``field`` (older results did not), or '-'."""
    m, _ = _mean_std([r.get(field) for r in runs])
    return "-" if m is None else f"{m:.{digits}f}"


def _spread(values: list) -> str:
    """mean ± std [min, max] of a cell's seeds."""
    m, s = _mean_std(values)
    return f"{m:.3f} ± {s:.3f} [{min(values):.3f}, {max(values):.3f}]"


def write_plus_report(plus: list, main: list, size: str, doc: Path) -> None:
    """The RigL-plus section of ``doc``: each candidate against SET and faithful RigL on each family's
    90% ERK cell (mean ± std [min, max] over seeds), dense and small dense from the main study as
    bounds, the exploration metrics, and whether a candidate's seed range lies wholly below RigL's."""
    if not plus:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sparsity, dist = PLUS_CELL
    lines = [
        "## RigL-plus: candidate options against SET and faithful RigL",
        "",
        f"Produced by `python bench/quality_study.py --size {size} --study plus` (this section and its plot are "
        "written by it). Each row is one `\"rigl\"` block (`VARIANTS` in the script) at "
        f"{sparsity:.0%} {dist.upper()}, equal steps and data order, seeds 0-{SIZES[size]['seeds'] - 1}; "
        "values are mean ± std [min, max] over seeds. *wins* = every seed better than every faithful-RigL "
        "seed (non-overlapping ranges) at training FLOPs no higher than RigL's (*better at more FLOPs*: the "
        "same at higher FLOPs, no win); *beats SET* the same against SET. ITOP rate: fraction of masked "
        "entries ever active; fan-in CV: std / "
        "mean of active inputs per output unit, averaged over layers.",
        "",
    ]
    img_dir = doc.parent / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, (family, title, metric, unit) in zip(
        axes,
        (
            ("char_gru", "Character-level GRU", "bits_per_char", "bits/char"),
            ("gpt", "GPT-style transformer (BPE)", "perplexity", "perplexity"),
        ),
    ):
        runs = {}
        for r in plus:
            if r["family"] == family:
                runs.setdefault(r["method"], []).append(r)
        for name in MAIN_ALIASES:  # SET and faithful RigL: the main study's runs of the cell
            same = [r for r in main if r["family"] == family and r["method"] == name
                    and (r["sparsity"], r["distribution"]) == PLUS_CELL]
            if same and name not in runs:
                runs[name] = same
        if set(runs) <= set(MAIN_ALIASES):
            continue
        spec = SIZES[size][family]
        bounds = {
            "dense": [r for r in main if r["family"] == family and r["method"] == "dense"],
            "small_dense": [
                r for r in main if r["family"] == family and r["method"] == "small_dense" and r["sparsity"] == sparsity
            ],
        }
        lines += [
            f"### {title}, {sparsity:.0%} {dist.upper()}",
            "",
            ", ".join(f"{k} {v}" for k, v in spec["sizes"].items())
            + f"; {spec['steps']} steps of {spec['batch']} x {spec['seq']} tokens, Adam {spec['lr']}"
            + (f", warm-up {spec['warmup']} then cosine to {spec.get('lr_floor', 0)}x" if spec.get("warmup") else "")
            + f"; mask updates every {SIZES[size]['delta_t']} steps unless the variant says otherwise.",
            "",
            f"| variant | options | n | val {unit} | vs RigL | vs SET | training FLOPs vs dense | ITOP rate "
            "| fan-in CV (mean) | fan-in CV (max) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        ref = [r[metric] for r in runs.get("rigl", [])]
        ref_flops = _mean_std([r["training_flops_vs_dense"] for r in runs.get("rigl", [])])[0]
        set_ = [r[metric] for r in runs.get("set", [])]
        for name, rows in bounds.items():
            if rows:
                lines.append(
                    f"| {name} (main study) | - | {len(rows)} | {_spread([r[metric] for r in rows])} | | | "
                    f"{'1' if name == 'dense' else '-'} | | | |"
                )
        names = [v for v in VARIANTS if v in runs]
        for name in names:
            values = [r[metric] for r in runs[name]]
            method, options = VARIANTS[name]

            def ratio(other, values=values):
                return f"{statistics.fmean(values) / statistics.fmean(other):.3f}" if other else "-"

            better = ref and name != "rigl" and max(values) < min(ref)
            beats_set = set_ and name != "set" and max(values) < min(set_)
            fl, _ = _mean_std([r["training_flops_vs_dense"] for r in runs[name]])
            dearer = fl is not None and ref_flops is not None and fl > ref_flops * 1.001
            label = (" *better at more FLOPs*" if dearer else " **wins**") if better else ""
            lines.append(
                f"| {name}{label}{' **beats SET**' if beats_set else ''} | "
                f"`{json.dumps(options) if options else method}` | "
                f"{len(values)} | {_spread(values)} | {ratio(ref)} | {ratio(set_)} | "
                f"{'-' if fl is None else f'{fl:.3f}'} | {_fmt(runs[name], 'itop_rate')} | "
                f"{_fmt(runs[name], 'fan_in_cv_mean')} | {_fmt(runs[name], 'fan_in_cv_max')} |"
            )
        lines.append("")
        means = [statistics.fmean([r[metric] for r in runs[n]]) for n in names]
        stds = [_mean_std([r[metric] for r in runs[n]])[1] for n in names]
        colors = ["tab:gray" if n == "set" else "tab:red" if n == "rigl" else "tab:blue" for n in names]
        ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=3)
        for n, bound in bounds.items():
            if bound:
                ax.axhline(statistics.fmean([r[metric] for r in bound]), ls="--", lw=1, label=n,
                           color="black" if n == "dense" else "tab:green")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        spread = max(stds + [0.01])
        ax.set(ylabel=f"validation {unit}", title=f"{title}, {sparsity:.0%} {dist.upper()}",
               ylim=(min(means) - 3 * spread, max(means) + 3 * spread))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = img_dir / "rigl_plus.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    lines += [f"![RigL-plus candidates](img/{png.name})", ""]
    begin, end = "<!-- rigl-plus:begin -->", "<!-- rigl-plus:end -->"
    section = "\n".join([begin, *lines, end])
    text = doc.read_text() if doc.is_file() else "# Results\n\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)


def aggregate(results: list) -> dict:
    groups = {}
    for r in results:
        groups.setdefault((r["family"], r["method"], r["sparsity"], r["distribution"]), []).append(r)
    return groups


def write_report(results: list, size: str, out: Path, doc: Path, sections: str = "all") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plus = [r for r in results if r.get("study") == "plus"]
    results = [r for r in results if r.get("study") != "plus"]
    write_plus_report(plus, results, size, doc)
    if sections == "plus":
        print(f"wrote the RigL-plus section of {doc}")
        return
    groups = aggregate(results)
    # The section runs from its heading to the end marker: nothing above the heading is rewritten.
    begin, end = "## Quality study\n", "<!-- quality-study:end -->"
    old = doc.read_text() if doc.is_file() else ""
    previous = old[old.index(begin) : old.index(end)] if begin in old and end in old else ""
    lines = [
        "## Quality study",
        "",
        f"Produced by `python bench/quality_study.py --size {size}` (this file and the plots are written by it).",
        "Validation on the contiguous tail of the bundled KJV text; equal steps for every method except",
        "`rigl_2x`; mean and standard deviation over seeds (n = number of seeds that finished).",
        "Training FLOPs are the paper's accounting (`rigl_ds.flops`) as a multiple of training the dense",
        "model for the standard number of steps.",
        "",
    ]
    expected = sum(1 for _ in settings(SIZES[size]["seeds"], size))
    if len(results) < expected:
        lines += [
            f"**Incomplete: {len(results)} of {expected} runs have finished.** Cells with n below "
            f"{SIZES[size]['seeds']} have fewer seeds, and missing cells have not run yet; rerun the command "
            "to continue from the results file.",
            "",
        ]
    img_dir = doc.parent / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    verdicts = []
    for family, title, metric, unit in (
        ("char_gru", "Character-level GRU", "bits_per_char", "bits/char"),
        ("gpt", "GPT-style transformer (BPE)", "perplexity", "perplexity"),
    ):
        rows = [(k, v) for k, v in groups.items() if k[0] == family]
        if not rows:
            # No result of this family under the present settings: keep its table from the document
            # (an earlier run whose raw results are not in the file), marked as such.
            heading = f"### {title}\n"
            if heading in previous:
                kept = previous[previous.index(heading) + len(heading) :]
                kept = kept[: kept.index("\n### ")] if "\n### " in kept else kept
                note = "*Kept from an earlier run of the study: its raw results are not in the results file.*"
                body = kept.strip("\n").split("\n")
                if body and body[0] == note:
                    body = body[2:]
                lines += [heading.rstrip("\n"), "", note, "", *body, ""]
                verdicts += [v for v in previous.splitlines() if v.startswith(f"- {title}, ")]
            continue
        spec = SIZES[size][family]
        lines += [
            f"### {title}",
            "",
            ", ".join(f"{k} {v}" for k, v in spec["sizes"].items())
            + f"; {spec['steps']} steps of {spec['batch']} x {spec['seq']} tokens, Adam {spec['lr']}"
            + (f" (warm-up {spec['warmup']} steps, cosine to {spec.get('lr_floor', 0)}x)" if spec.get("warmup") else "")
            + f", mask updates every {SIZES[size]['delta_t']} steps.",
            "",
            f"| method | sparsity | distribution | n | params | val {unit} |"
            + (" val bits/char |" if metric != "bits_per_char" else "")
            + " training FLOPs vs dense | ITOP rate | fan-in CV (mean) |",
            "|---|---|---|---|---|---|---|---|---|" + ("---|" if metric != "bits_per_char" else ""),
        ]

        def order(item):
            (_, method, sparsity, dist), _ = item
            return (sparsity, dist, ORDER.index(method))

        for (_, method, sparsity, dist), runs in sorted(rows, key=order):
            m, s = _mean_std([r[metric] for r in runs])
            b, bs = _mean_std([r["bits_per_char"] for r in runs])
            fl, _ = _mean_std([r["training_flops_vs_dense"] for r in runs])
            flops = "1" if method == "dense" else ("-" if fl is None else f"{fl:.3f}")
            bits = f" {b:.4f} ± {bs:.4f} |" if metric != "bits_per_char" else ""
            lines.append(
                f"| {method} | {sparsity:.1f} | {dist} | {len(runs)} | {runs[0]['params']:,} | {m:.3f} ± {s:.3f} |"
                f"{bits} {flops} | {_fmt(runs, 'itop_rate')} | {_fmt(runs, 'fan_in_cv_mean')} |"
            )
        lines.append("")
        # The paper's claim at equal sparsity and steps: RigL >= SNFS > SET > static (lower metric is better).
        for sparsity in (0.8, 0.9):
            for dist in ("erk", "uniform"):
                score = {}
                for method in ("rigl", "snfs", "set", "static"):
                    runs = groups.get((family, method, sparsity, dist))
                    if runs:
                        score[method] = _mean_std([r[metric] for r in runs])
                if len(score) < 4:
                    continue
                ranked = sorted(score, key=lambda k: score[k][0])
                holds = ranked == ["rigl", "snfs", "set", "static"] or (
                    ranked[:2] == ["snfs", "rigl"]
                    and abs(score["rigl"][0] - score["snfs"][0]) <= max(score["rigl"][1], score["snfs"][1])
                    and ranked[2:] == ["set", "static"]
                )
                order_text = " < ".join(f"{k} {score[k][0]:.3f}" for k in ranked)
                verdicts.append(
                    f"- {title}, {sparsity:.0%} {dist}: {order_text} -> the paper's ordering "
                    f"{'holds' if holds else 'does NOT hold'}."
                )
        fig, ax = plt.subplots(figsize=(10, 4))
        labels, means, stds = [], [], []
        for (_, method, sparsity, dist), runs in sorted(rows, key=order):
            m, s = _mean_std([r[metric] for r in runs])
            labels.append(f"{method}\n{sparsity:.1f} {dist}" if method != "dense" else "dense")
            means.append(m)
            stds.append(s)
        ax.bar(range(len(means)), means, yerr=stds, color="tab:blue", capsize=2)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        low = min(means) - 2 * max(stds + [0.01])
        ax.set(ylabel=f"validation {unit}", title=title, ylim=(max(0.0, low), max(means) + 2 * max(stds + [0.01])))
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        png = img_dir / f"quality_{family}.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        lines += [f"![{title}](img/{png.name})", ""]
    lines += ["### Does the paper's ordering hold here?", "", *verdicts, ""]
    total = sum(r["seconds"] for r in results)
    wall = out / "wall_seconds.txt"
    if wall.is_file():
        lines += [
            f"Wall time of the study on this machine, all invocations: {float(wall.read_text()) / 60:.1f} minutes.",
            "",
        ]
    lines += [
        f"Training time of all {len(results)} runs, added up: {total / 60:.1f} minutes (evaluation and set-up "
        "excluded; runs in parallel add up to more than the wall time).",
        "",
    ]
    # Only the study's own section of the document is rewritten; the benchmark sections stay.
    section = "\n".join([*lines, end])
    text = doc.read_text() if doc.is_file() else "# Results\n\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)
    print(f"wrote {doc}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--family", choices=["char_gru", "gpt"], default=None, help="run only this family")
    p.add_argument("--out", type=Path, default=None, help="default: runs/quality/<size>")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each (CPU)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per run")
    p.add_argument("--study", choices=["all", "main", "plus"], default="all")
    p.add_argument("--variants", default=None, help=f"plus study: comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--methods", default=None, help="main study: comma-separated subset of its methods")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the size's)")
    p.add_argument(
        "--sections", choices=["all", "plus"], default="all", help="docs/results.md sections to rewrite"
    )
    args = p.parse_args()
    variants = args.variants.split(",") if args.variants else None
    unknown = [v for v in variants or [] if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    out = args.out or ROOT / "runs" / "quality" / args.size
    if args.report_only:
        results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
        results = list({key(r): r for r in results if current(r, args.size)}.values())  # one per run
    else:
        start = time.time()
        results = run_study(
            args.size,
            out,
            args.device,
            args.family,
            args.workers,
            args.study,
            variants,
            args.threads,
            args.methods.split(",") if args.methods else None,
            args.seeds,
        )
        wall = out / "wall_seconds.txt"
        previous = float(wall.read_text()) if wall.is_file() else 0.0
        wall.write_text(str(previous + time.time() - start))
    write_report(results, args.size, out, args.doc, args.sections)


if __name__ == "__main__":
    main()
