"""Training throughput of DiT backbones (forward + backward + AdamW), side by side.

    python benchmarks/train_throughput.py [--configs DiT-S/2 DiT-Tiny/2] [--batch 8] [--steps 5]
    python benchmarks/train_throughput.py --device cuda --configs DiT-S/2 DiT-XL/2 --batch 256 \
        --setups fp32 bf16 bf16+compile --official path/to/DiT/models.py

Prints images/s per configuration and setup (precision, ``+compile`` for ``torch.compile``),
measured in one run, with ratios against the first row of each backbone, and the model FLOP
utilisation (MFU: training FLOPs counted by ``torch.utils.flop_counter`` on one step, times
steps per second, over the device's peak bf16 rate, ``--peak-tflops``; CUDA only). With
``--official`` the official DiT ``models.py`` is measured beside ours under the same setups.
Each row is printed (and flushed) as soon as it is measured; ``--markdown`` prints the table
as markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from noisevalue import registry
from noisevalue.diffusion import Diffusion

SHAPES = {"DiT-Tiny/2": (1, 8, 10)}  # (channels, size, classes); others: 4x32x32, 1000
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def official_factory(path: str) -> Callable[[str, int, int, int], torch.nn.Module]:
    """The official DiT ``models.py`` (its ``DiT_models`` table), loaded from a file."""
    spec = importlib.util.spec_from_file_location("official_dit_models", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def make(name: str, size: int, channels: int, classes: int) -> torch.nn.Module:
        model = module.DiT_models[name](input_size=size, in_channels=channels, num_classes=classes)
        return model

    return make


def measure(
    make: Callable[[], torch.nn.Module], shape: tuple[int, int, int], batch: int, steps: int,
    setup: str, device: torch.device,
) -> tuple[float, float, float]:
    """(images/s, peak MiB or nan, training FLOPs of one step)."""
    c, size, classes = shape
    torch.manual_seed(0)
    model = make().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    diffusion = Diffusion()
    x0 = torch.randn(batch, c, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    bf16 = setup.startswith("bf16")
    runner = torch.compile(model) if setup.endswith("+compile") else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> None:
        t = torch.randint(0, 1000, (batch,), device=device)
        with autocast:
            loss = diffusion.per_sample_loss(runner, x0, t, y, torch.randn_like(x0)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        with autocast:
            loss = diffusion.per_sample_loss(model, x0, torch.randint(0, 1000, (batch,), device=device), y,
                                             torch.randn_like(x0)).mean()
        loss.backward()
    opt.zero_grad(set_to_none=True)
    flops = float(counter.get_total_flops())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup = 3 if setup.endswith("+compile") else 1
    times = []
    for i in range(steps + warmup):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return batch / statistics.median(times), peak, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["DiT-S/2", "DiT-Tiny/2"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--setups", nargs="+", default=["fp32", "bf16"],
                        choices=["fp32", "bf16", "fp32+compile", "bf16+compile"])
    parser.add_argument("--official", default=None, help="path to the official DiT models.py")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak bf16 TFLOP/s")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the official DiT's setting
        torch.backends.cudnn.allow_tf32 = True
    peak = args.peak_tflops or peak_tflops(device)
    impls: list[tuple[str, Callable[[str, int, int, int], torch.nn.Module]]] = [
        ("noisevalue", lambda n, s, c, k: registry.create("backbone", n, input_size=s, in_channels=c, num_classes=k))
    ]
    if args.official:
        impls.insert(0, ("official", official_factory(args.official)))
    head = (f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
            f"threads {torch.get_num_threads()}, batch {args.batch}, median of {args.steps} steps after warm-up")
    # each row printed as soon as it is measured: a run stopped part-way keeps what it has
    if args.markdown:
        print(head + "\n", flush=True)
        print("| backbone | code | setup | images/s | ratio | MFU | peak MiB |\n|---|---|---|---|---|---|---|", flush=True)
    else:
        print(head)
        print(f"{'backbone':<12} {'code':<11} {'setup':<13} {'images/s':>10} {'ratio':>7} {'MFU':>6} {'peak MiB':>9}",
              flush=True)
    for name in args.configs:
        c, size, classes = shape = SHAPES.get(name, (4, 32, 1000))
        base = None
        for impl, factory in impls:
            for setup in args.setups:
                make = functools.partial(factory, name, size, c, classes)
                ips, mem, flops = measure(make, shape, args.batch, args.steps, setup, device)
                base = base or ips
                mfu = flops * ips / args.batch / (peak * 1e12) if peak else float("nan")
                ratio = ips / base
                if args.markdown:
                    print(f"| {name} | {impl} | {setup} | {ips:,.0f} | {ratio:.2f}x | {mfu:.0%} | {mem:,.0f} |", flush=True)
                else:
                    print(f"{name:<12} {impl:<11} {setup:<13} {ips:>10.2f} {ratio:>7.2f} {mfu:>6.1%} {mem:>9.0f}",
                          flush=True)

if __name__ == "__main__":
    main()
