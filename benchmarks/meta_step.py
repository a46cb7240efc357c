"""Memory and time of one rater outer step, per meta-gradient engine and inner-loop length S.

Every (engine, S) runs in its own subprocess so that peak memory is isolated. A one-sample
step runs first (lazy initialisation of forward-mode AD is not part of the cost), then
``--warmup`` full-size steps (default 1), neither timed nor counted in the peak: on a GPU
the first full-size steps are slower than later ones (kernel selection, allocator growth).
Then ``--repeats`` steps (default 1) are timed; time is their median. Peak memory is the
high-water mark over the timed steps, as growth over the memory held just before them: on
CUDA ``torch.cuda.max_memory_allocated`` (reset after the warm-up) over
``torch.cuda.memory_allocated``; on CPU the resident-set high-water mark (``VmHWM``, reset
through ``/proc/self/clear_refs``; ``ru_maxrss``, which cannot be reset, where that is not
possible) over ``VmRSS``.

The inner optimizer is plain SGD at lr 1e-2 by default, as the paper recipes
(``meta.inner_optimizer: sgd``, ``meta.inner_lr: 1.0e-2``); ``--inner-optimizer adam``
unrolls Adam instead (lr 1e-4 unless ``--inner-lr`` says otherwise).

    python benchmarks/meta_step.py                       # DiT-Tiny/2, 16x16x4, CPU
    python benchmarks/meta_step.py --device cuda --model DiT-S/2 --size 32
    # one inner loop of the paper recipes' per-GPU share (meta.subproblems 16 of 32 groups
    # x K=8, validation batch 64): 2 groups x K=8, validation batch 4, in 2 chunks, S = 5
    python benchmarks/meta_step.py --device cuda --model DiT-S/2 --size 32 --batch 2 --k 8 \
        --val-batch 4 --chunks 2 --rater dual_stream --s-values 5 --engines unrolled-mixed \
        --warmup 1 --repeats 3

``--attention math,blocked`` measures each engine with PyTorch's math attention kernel and
with blocked attention (``meta.attention: blocked``, ``--attention-block`` queries at a time)
side by side, and prints the blocked run's peak memory and time as ratios of the math one's.
``--precision fp32,bf16`` adds bf16 compute (``meta.precision: bf16``, float32 meta-state;
blocked attention only), with its ratios to the first variant measured.

``--chunks 1,4`` measures each engine with each chunk count (``meta.chunks``: the batches
differentiated in that many parts, one at a time). ``--checkpointing on`` recomputes the blocks' activations in the backward passes
(``meta.activation_checkpointing``), for the engines that differentiate by reverse mode only;
``both`` measures each such engine without and with it, side by side. Each row is printed
(and flushed) as soon as it is measured.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ENGINES = ["unrolled-reverse", "unrolled-mixed", "unrolled-mixed-db", "implicit", "one_step"]


def rss_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB (peak: ``ru_maxrss`` without /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Give the heap's free memory back to the OS (glibc), so that the measured steps' growth
    over the resident set is not hidden by memory the warm-up freed but the process kept."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_one(args: argparse.Namespace) -> dict:
    import torch
    from torch import nn

    from noisevalue.backbones.dit import DiT
    from noisevalue.diffusion import Diffusion
    from noisevalue.meta import (
        GroupedBatch,
        Implicit,
        OneStep,
        PlainBatch,
        Unrolled,
        make_problem,
        param_dict,
    )

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    depth, hidden, heads, patch = {
        "DiT-Tiny/2": (4, 128, 4, 2),
        "DiT-S/2": (12, 384, 6, 2),
    }[args.model]
    torch.manual_seed(0)
    backbone = DiT(
        args.size, patch, args.channels, hidden, depth, heads, num_classes=10, learn_sigma=False
    )
    with torch.no_grad():  # leave adaLN-Zero's all-zero start so every gradient is non-trivial
        for p in backbone.parameters():
            if p.requires_grad:
                p.add_(1e-2 * torch.randn_like(p))
    d = args.channels * args.size * args.size

    class SmallRater(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n, self.x = nn.Linear(d, 256), nn.Linear(d, 256)
            self.t, self.out = nn.Embedding(1000, 256), nn.Linear(256, 1)

        def forward(self, noise, t, x0, y):
            h = torch.nn.functional.silu(
                self.n(noise.flatten(1)) + self.x(x0.flatten(1)) + self.t(t)
            )
            return self.out(h).squeeze(-1)

    if args.rater == "small":
        rater = SmallRater()
    else:
        from noisevalue import registry

        rater = registry.create("rater", args.rater, input_size=args.size, in_channels=args.channels, num_classes=10)
    backbone, rater = backbone.to(device), rater.to(device)
    for net in (backbone, rater):
        net.gradient_checkpointing = bool(args.ckpt)  # type: ignore[assignment]
    g = torch.Generator().manual_seed(1)
    shape = (args.channels, args.size, args.size)

    def common(b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            torch.randn(b, *shape, generator=g).to(device),
            torch.randint(0, 11, (b,), generator=g).to(device),
            torch.randint(0, 1000, (b,), generator=g).to(device),
        )

    inner = [
        GroupedBatch(
            *common(args.batch), torch.randn(args.batch, args.k, *shape, generator=g).to(device)
        )
        for _ in range(args.steps)
    ]
    vb = args.val_batch or args.batch
    val = PlainBatch(*common(vb), torch.randn(vb, *shape, generator=g).to(device))
    block = args.attention_block if args.attn == "blocked" else None
    problem = make_problem(
        backbone, rater, Diffusion(), inner, val, args.inner_optimizer, args.inner_lr, chunks=args.chunk,
        attention_block=block, precision=args.prec,
    )
    engine = {
        "unrolled-reverse": lambda: Unrolled("reverse"),
        "unrolled-mixed": lambda: Unrolled("mixed"),
        "unrolled-mixed-db": lambda: Unrolled("mixed", hvp="double_backward"),
        "implicit": lambda: Implicit(iterations=args.cg_iterations, damping=1e-3),
        "one_step": lambda: OneStep(),
    }[args.engine]()
    theta, eta = param_dict(backbone), param_dict(rater)
    # Warm up on a one-sample problem: the first forward-mode pass lazily builds PyTorch's
    # jvp decompositions (seconds, hundreds of MiB), which is no part of the step's cost.
    tiny = GroupedBatch(*common(1), torch.randn(1, 2, *shape, generator=g).to(device))
    tiny_val = PlainBatch(*common(1), torch.randn(1, *shape, generator=g).to(device))
    engine.meta_gradient(
        make_problem(backbone, rater, Diffusion(), [tiny], tiny_val, args.inner_optimizer, args.inner_lr,
                     attention_block=block, precision=args.prec),
        theta,
        eta,
    )
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):  # full-size, neither timed nor counted in the peak
        engine.meta_gradient(problem, theta, eta)
    sync()
    gc.collect()  # nothing of the warm-up left in the measured steps' baseline
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        trim_heap()
        exact = reset_peak_rss()
        base = rss_kib("VmRSS") * 1024
    times, outer_loss = [], float("nan")
    for _ in range(max(1, args.repeats)):
        sync()
        t0 = time.perf_counter()
        # the result is not kept across steps: the previous meta-gradient would count in the peak
        outer_loss = engine.meta_gradient(problem, theta, eta).outer_loss
        sync()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (rss_kib("VmHWM") if exact else rss_kib("ru_maxrss")) * 1024 - base
    return {
        "engine": label(args.engine, args.ckpt, args.chunk, args.attn, args.prec),
        "S": args.steps,
        "peak_mib": peak / 2**20,
        "time_s": statistics.median(times),
        "outer_loss": outer_loss,
        "params_M": sum(v.numel() for v in theta.values()) / 1e6,
    }


def label(engine: str, ckpt: int, chunk: int, attn: str, prec: str) -> str:
    return (engine + ("+ckpt" if ckpt else "") + (f"/{chunk}" if chunk > 1 else "")
            + ("+blocked" if attn == "blocked" else "") + ("+bf16" if prec == "bf16" else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=ENGINES)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--s-values", default="1,2,5,10")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="DiT-Tiny/2", choices=["DiT-Tiny/2", "DiT-S/2"])
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--inner-optimizer", "--optimizer", dest="inner_optimizer", choices=["sgd", "adam"], default="sgd",
                    help="the unrolled inner optimizer (default sgd, as the paper recipes)")
    ap.add_argument("--inner-lr", type=float, default=None, help="inner learning rate (default: 1e-2 sgd, 1e-4 adam)")
    ap.add_argument("--cg-iterations", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1, help="full-size steps run first, not timed nor counted in the peak")
    ap.add_argument("--repeats", type=int, default=1, help="timed steps (median); the peak is over all of them")
    ap.add_argument("--val-batch", type=int, default=None, help="validation batch (default: --batch)")
    ap.add_argument("--rater", default="small", help="'small' (an MLP) or a registered rater, e.g. dual_stream")
    ap.add_argument("--checkpointing", choices=["off", "on", "both"], default="off")
    ap.add_argument("--ckpt", type=int, default=0, help=argparse.SUPPRESS)  # one run: on or off
    ap.add_argument("--chunks", default="1", help="comma-separated chunk counts to measure")
    ap.add_argument("--chunk", type=int, default=1, help=argparse.SUPPRESS)  # one run's
    ap.add_argument("--attention", default="math", help="comma-separated: math, blocked")
    ap.add_argument("--attention-block", type=int, default=64, help="queries per block of blocked attention")
    ap.add_argument("--attn", default="math", help=argparse.SUPPRESS)  # one run's
    ap.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16")
    ap.add_argument("--prec", default="fp32", help=argparse.SUPPRESS)  # one run's
    args = ap.parse_args()
    if args.inner_lr is None:
        args.inner_lr = 1e-2 if args.inner_optimizer == "sgd" else 1e-4
    if args.engine is not None:
        print(json.dumps(run_one(args)))
        return
    passthrough = []
    for key, value in vars(args).items():
        if key not in ("engine", "steps", "s_values", "engines", "checkpointing", "ckpt", "val_batch", "chunks", "chunk",
                       "attention", "attn", "precision", "prec"):
            passthrough += ["--" + key.replace("_", "-"), str(value)]
    print(
        f"{args.model} {args.channels}x{args.size}x{args.size}, B={args.batch}, K={args.k}, "
        f"inner {args.inner_optimizer} lr {args.inner_lr:g}, device {args.device}, threads {args.threads}, "
        f"{args.warmup} warm-up step(s), median of {max(1, args.repeats)} timed step(s)",
        flush=True,
    )
    if args.val_batch:
        passthrough += ["--val-batch", str(args.val_batch)]
    recompute_ok = {"unrolled-reverse", "unrolled-mixed-db"}  # reverse mode only
    modes = {"off": [0], "on": [1], "both": [0, 1]}[args.checkpointing]
    variants = [(a, p) for a in args.attention.split(",") for p in args.precision.split(",")
                if not (a == "math" and p == "bf16")]  # bf16 needs blocked attention
    ratios = len(variants) > 1
    print(f"{'engine':<35}{'S':>4}{'peak MiB':>11}{'time s':>9}" + (f"{'peak ratio':>12}{'time ratio':>12}" if ratios else ""),
          flush=True)
    for engine in args.engines.split(","):
        chunk_counts = [int(c) for c in args.chunks.split(",")]
        for s, ckpt, chunk in ((int(v), c, n) for v in args.s_values.split(",") for c in modes for n in chunk_counts):
            if ckpt and engine not in recompute_ok:
                continue
            first = None
            for attn, prec in variants:
                cmd = [sys.executable, __file__, *passthrough, "--engine", engine, "--steps", str(s), "--ckpt", str(ckpt),
                       "--chunk", str(chunk), "--attn", attn, "--prec", prec]
                # large blocks through mmap, so that freed memory leaves the resident set
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"{label(engine, ckpt, chunk, attn, prec):<35}{s:>4}  failed: {last}", flush=True)
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                row = f"{r['engine']:<35}{s:>4}{r['peak_mib']:>11.1f}{r['time_s']:>9.3f}"
                if ratios and first is not None:
                    row += f"{r['peak_mib'] / first['peak_mib']:>12.2f}{r['time_s'] / first['time_s']:>12.2f}"
                first = first or r
                print(row, flush=True)


if __name__ == "__main__":
    main()
