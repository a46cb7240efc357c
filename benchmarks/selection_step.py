"""Cost of rater-guided noise selection: training-step time at k candidates vs. vanilla.

    python benchmarks/selection_step.py [--size 16] [--batch 8] [--steps 5] [--ks 1 2 4 8]
    python benchmarks/selection_step.py --device cuda --size 32 --batch 256 --precision bf16 --compile
    python benchmarks/selection_step.py --rater dual_stream_shared --rater-param noise_patch_size=4

Measures, side by side in one run, the time of one training step (DiT forward + backward +
AdamW, plus scoring k candidates per sample with a frozen dual-stream rater when k > 1),
and divides by the vanilla step (k = 1). Beside it, the ratio predicted from FLOPs counted
with torch.utils.flop_counter on the same step, run eager on the uncompiled modules and in
fp32 (the FLOPs of the arithmetic asked for, whatever kernels run it). Defaults: DiT-S/2 and the paper's rater at 16x16x4 latents so that it
runs in a minute on a laptop CPU. ``--precision bf16`` trains under bf16 autocast and scores
in bf16 (the flash attention kernel on CUDA); ``--compile`` compiles the rater (with CUDA
graphs on CUDA) as the ``rater`` selector's ``compile`` option does. The DiT is compiled as
the trainer compiles it (``torch.compile(model)``, ``train.compile``: on with CUDA) with
``--compile`` or on CUDA; ``--no-compile-dit`` keeps it eager. ``--warmup`` untimed steps
per k (default 3 when anything is compiled, else 1) keep compilation and CUDA graph capture
out of the times. Each row is printed (and flushed) as soon as it is measured; ``--markdown``
prints the table as markdown.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from noisevalue import registry
from noisevalue.diffusion import Diffusion
from noisevalue.selectors.builtin import RaterSelector


def make_step(model, opt, selector, diffusion, x0, y, k, bf16=False):
    autocast = torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> None:
        n, dev = x0.shape[0], x0.device
        t = torch.randint(0, 1000, (n,), device=dev)
        candidates = torch.randn(n, k, *x0.shape[1:], device=dev)
        if k > 1:
            with torch.no_grad():
                pick = selector.select(x0, y, t, candidates)
            noise = candidates[torch.arange(n, device=dev), pick]
        else:
            noise = candidates[:, 0]
        with autocast:
            loss = diffusion.per_sample_loss(model, x0, t, y, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="DiT-S/2")
    parser.add_argument("--rater", default="dual_stream")
    parser.add_argument("--rater-param", action="append", default=[], metavar="KEY=VALUE",
                        help="a rater argument, e.g. noise_patch_size=4 (repeatable; values parsed as YAML)")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="compile the rater (CUDA graphs on CUDA) and the DiT")
    parser.add_argument("--compile-dit", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the DiT as the trainer does (default: with --compile or on CUDA)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per k (default: 3 when anything is compiled, else 1)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = dict(input_size=args.size, in_channels=4, num_classes=1000)
    model = registry.create("backbone", args.backbone, **shape).to(device)
    extra = {}
    for item in args.rater_param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--rater-param {item!r}: expected KEY=VALUE")
        extra[key] = yaml.safe_load(value)
    rater = registry.create("rater", args.rater, **shape, **extra).eval().requires_grad_(False).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    diffusion = Diffusion()
    x0 = torch.randn(args.batch, 4, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    compile_dit = args.compile_dit if args.compile_dit is not None else (args.compile or device.type == "cuda")
    runner = torch.compile(model) if compile_dit else model  # as the trainer (train.compile)
    warmup = args.warmup if args.warmup is not None else (3 if args.compile or compile_dit else 1)

    params = "".join(f" {p}" for p in args.rater_param)
    compiled = " and ".join(n for n, c in (("rater", args.compile), ("DiT", compile_dit)) if c)
    print(f"{args.backbone} + {args.rater}{params} rater, latents 4x{args.size}x{args.size}, batch {args.batch}, "
          f"device {device}, {args.precision}{', ' + compiled + ' compiled' if compiled else ''}, "
          f"threads {torch.get_num_threads()}, median of {args.steps} steps after {warmup} warm-up step(s); "
          f"FLOPs of the eager fp32 step", flush=True)
    if args.markdown:
        print("\n| k | step s | time ratio | FLOP ratio | time / FLOP ratio |\n|---|---|---|---|---|", flush=True)
    else:
        print(f"{'k':>3} {'step s':>8} {'time ratio':>11} {'GFLOPs':>9} {'FLOP ratio':>11}", flush=True)
    base = None
    for k in args.ks:
        selector = RaterSelector(k=k, rater=rater, precision=args.precision, compile=args.compile) if k > 1 else None
        step = make_step(runner, opt, selector, diffusion, x0, y, k, bf16=args.precision == "bf16")
        flop_step = make_step(model, opt, RaterSelector(k=k, rater=rater, precision="fp32", compile=False)
                              if k > 1 else None, diffusion, x0, y, k)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            flop_step()  # FLOPs of the eager fp32 step, on the uncompiled modules
        flops = counter.get_total_flops()
        for _ in range(warmup):
            step()  # compilation, CUDA graph capture, the allocator's growth
        times = []
        for _ in range(args.steps):
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        t = statistics.median(times)
        base = base or (t, flops)  # ratios against the first k measured (k = 1 by default)
        r_t, r_f = t / base[0], flops / base[1]
        if args.markdown:
            print(f"| {k} | {t:.4f} | {r_t:.2f}x | {r_f:.2f}x | {r_t / r_f:.2f} |", flush=True)
        else:
            print(f"{k:>3} {t:>8.3f} {r_t:>11.2f} {flops / 1e9:>9.1f} {r_f:>11.2f}", flush=True)

if __name__ == "__main__":
    main()
