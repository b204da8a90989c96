"""Per-step cost of rigl_ds's plain-PyTorch path against the same loop without it, measured in one run.

Builds a Hugging Face GPT-2 from config (no download), trains it dense and sparse with AdamW, and
prints: optimizer-step time without rigl_ds, sparse.step() time between updates, the mask-update
step, mask initialisation, and their ratios. CPU by default; --device cuda on a GPU.

    python bench/plain_overhead.py                 # GPT-2 small (124M), 90% ERK RigL
    python bench/plain_overhead.py --layers 4 --embd 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import rigl_ds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--embd", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=args.layers, n_embd=args.embd, n_head=args.heads)
    x = torch.randint(0, cfg.vocab_size, (1, args.seq), device=args.device)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    iteration = {}

    def timed_steps(model, opt, stepper, n, key=None):
        times, whole = [], []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            model(x, labels=x).loss.backward()
            sync()
            t = time.perf_counter()
            stepper()
            sync()
            times.append(time.perf_counter() - t)
            whole.append(time.perf_counter() - t0)
            opt.zero_grad(set_to_none=True)
        if key:
            iteration[key] = statistics.median(whole)
        return times

    model = transformers.GPT2LMHeadModel(cfg).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    timed_steps(model, opt, opt.step, 1)  # warm-up: optimizer state allocation
    dense = statistics.median(timed_steps(model, opt, opt.step, args.steps, key="dense"))

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sync()
    t = time.perf_counter()
    sparse = rigl_ds.sparsify(
        model, opt, {"sparsity": args.sparsity, "delta_t": 1000, "begin_step": 1, "end_step": 10_000}
    )
    sync()
    init = time.perf_counter() - t
    timed_steps(model, opt, sparse.step, 1)  # step 0: warm-up, no update
    between = statistics.median(timed_steps(model, opt, sparse.step, args.steps, key="sparse"))
    sparse.controller.last_update = sparse.controller.step - 1000  # make the next step an update
    update = timed_steps(model, opt, sparse.step, 1)[0]
    assert sparse.controller.was_update_step
    n_masked = sum(m.numel() for m in sparse.masks.values())
    params = sum(p.numel() for p in model.parameters())
    print(f"model: GPT-2 {args.layers}x{args.embd}, {params / 1e6:.1f}M parameters, {n_masked / 1e6:.1f}M masked")
    print(f"device: {args.device}, threads {torch.get_num_threads()}, {args.steps} timed steps each (medians)")
    print(f"optimizer step without rigl_ds (median): {dense * 1e3:8.1f} ms")
    print(f"sparse.step() between updates (median):  {between * 1e3:8.1f} ms   ratio {between / dense:.2f}x")
    print(f"sparse.step() on a RigL update step:     {update * 1e3:8.1f} ms   ratio {update / dense:.2f}x")
    print(f"mask initialisation:                     {init * 1e3:8.1f} ms")
    print(f"update amortised over delta_t=100:       {(between * 99 + update) / 100 / dense:.2f}x the optimizer step")
    d, sp = iteration["dense"], iteration["sparse"]
    amortised = (sp * 99 + (sp - between + update)) / 100
    print(f"whole iteration (fwd+bwd+step), median: dense {d * 1e3:.1f} ms, sparse between updates {sp * 1e3:.1f} ms")
    print(f"whole-iteration ratio: {sp / d:.2f}x between updates, {amortised / d:.2f}x amortised over delta_t=100")


if __name__ == "__main__":
    main()
