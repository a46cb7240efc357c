"""Cost of rater-guided noise selection: training-step time at k candidates vs. vanilla.

    python benchmarks/selection_step.py [--size 16] [--batch 8] [--steps 5] [--ks 1 2 4 8]

Measures, side by side in one run, the time of one training step (DiT forward + backward +
AdamW, plus scoring k candidates per sample with a frozen dual-stream rater when k > 1),
and divides by the vanilla step (k = 1). Beside it, the ratio predicted from FLOPs counted
with torch.utils.flop_counter on the same step. Defaults: DiT-S/2 and the paper's rater at
16x16x4 latents so that it runs in a minute on a laptop CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from noisevalue import registry
from noisevalue.diffusion import Diffusion
from noisevalue.selectors.builtin import RaterSelector


def make_step(model, opt, selector, diffusion, x0, y, k):
    def step() -> None:
        n = x0.shape[0]
        t = torch.randint(0, 1000, (n,))
        candidates = torch.randn(n, k, *x0.shape[1:])
        if k > 1:
            with torch.no_grad():
                pick = selector.select(x0, y, t, candidates)
            noise = candidates[torch.arange(n), pick]
        else:
            noise = candidates[:, 0]
        loss = diffusion.per_sample_loss(model, x0, t, y, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="DiT-S/2")
    parser.add_argument("--rater", default="dual_stream")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = dict(input_size=args.size, in_channels=4, num_classes=1000)
    model = registry.create("backbone", args.backbone, **shape)
    rater = registry.create("rater", args.rater, **shape).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    diffusion = Diffusion()
    x0 = torch.randn(args.batch, 4, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))

    rows = []
    for k in args.ks:
        selector = RaterSelector(k=k, rater=rater) if k > 1 else None
        step = make_step(model, opt, selector, diffusion, x0, y, k)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            step()  # also the warm-up
        flops = counter.get_total_flops()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        rows.append((k, statistics.median(times), flops))

    base_time, base_flops = rows[0][1], rows[0][2]
    print(f"{args.backbone} + {args.rater} rater, latents 4x{args.size}x{args.size}, batch {args.batch}, "
          f"threads {torch.get_num_threads()}, median of {args.steps} steps")
    print(f"{'k':>3} {'step s':>8} {'time ratio':>11} {'GFLOPs':>9} {'FLOP ratio':>11}")
    for k, t, f in rows:
        print(f"{k:>3} {t:>8.3f} {t / base_time:>11.2f} {f / 1e9:>9.1f} {f / base_flops:>11.2f}")


if __name__ == "__main__":
    main()
