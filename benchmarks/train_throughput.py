"""Training throughput of DiT backbones (forward + backward + AdamW), side by side.

    python benchmarks/train_throughput.py [--configs DiT-S/2 DiT-Tiny/2] [--batch 8] [--steps 5]

Prints images/s per configuration and precision, measured in one run, with ratios against
the first row. On CPU, bf16 autocast is included for comparison; on CUDA, SDPA kernels are
whatever PyTorch picks (flash / memory-efficient), and peak memory is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from noisevalue import registry
from noisevalue.diffusion import Diffusion

SHAPES = {"DiT-Tiny/2": (1, 8, 10)}  # (channels, size, classes); others: 4x32x32, 1000


def measure(name: str, batch: int, steps: int, precision: str, device: torch.device) -> tuple[float, float]:
    c, size, classes = SHAPES.get(name, (4, 32, 1000))
    torch.manual_seed(0)
    model = registry.create("backbone", name, input_size=size, in_channels=c, num_classes=classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    diffusion = Diffusion()
    x0 = torch.randn(batch, c, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 1):
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss = diffusion.per_sample_loss(model, x0, t, y, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step is warm-up
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return batch / statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["DiT-S/2", "DiT-Tiny/2"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"median of {args.steps} steps after 1 warm-up")
    print(f"{'backbone':<12} {'precision':<9} {'images/s':>10} {'ratio':>7} {'peak MiB':>9}")
    for name in args.configs:
        base = None
        for precision in args.precisions:
            ips, peak = measure(name, args.batch, args.steps, precision, device)
            base = base or ips
            print(f"{name:<12} {precision:<9} {ips:>10.2f} {ips / base:>7.2f} {peak:>9.0f}")


if __name__ == "__main__":
    main()
