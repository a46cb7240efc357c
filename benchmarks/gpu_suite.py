"""One GPU, one run: the figures of ``docs/benchmarks.md`` in about five minutes.

    python benchmarks/gpu_suite.py [--official path/to/DiT/models.py] [--out gpu_suite.md]
    python benchmarks/gpu_suite.py --device cpu --quick     # a check of the script itself

Runs, each in its own process and each side by side in one run:

1. training throughput and MFU of DiT-S/2 (batch 256) and DiT-XL/2 (batch 64) on 32x32x4
   latents, fp32 (TF32), bf16 and bf16 + ``torch.compile``; the official ``models.py`` beside
   ours when ``--official`` names it (``train_throughput.py``);
2. the selection step at k = 1, 2, 4, 8 against its FLOP ratio, with the paper's rater,
   with ``dual_stream_shared`` and with it on coarser noise patches, scoring in bf16 through a compiled rater (``selection_step.py``);
3. one rater outer step at the ImageNet recipe's per-GPU share (8 groups x K=8, validation
   batch 16, DiT-S/2, the paper's rater) for S = 1 and 5, per engine, without and with
   activation checkpointing: peak memory and time (``meta_step.py``);
4. the same share at S = 5, unrolled reverse and mixed, in 4 chunks (``meta.chunks: 4``, as
   the paper recipes), with the math attention kernel, with blocked attention, and with
   blocked attention in bf16: the memory levers' ratios, and whether 24 / 40 GiB are met.

Writes one markdown section (``--out``, default ``gpu_suite.md``) and prints it. A part that
fails or runs past its time is reported in the section and the rest still runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parts(args: argparse.Namespace) -> list[tuple[str, list[str], int]]:
    """(title, command, seconds allowed) per part."""
    dev = ["--device", args.device]
    if args.quick:  # tiny sizes: checks that every part runs, not a measurement
        return [
            ("Training throughput", ["train_throughput.py", *dev, "--configs", "DiT-Tiny/2", "--batch", "8",
                                     "--steps", "2", "--setups", "fp32", "bf16"], 300),
            ("Selection step", ["selection_step.py", *dev, "--backbone", "DiT-Tiny/2", "--rater", "dual_stream_tiny",
                                "--size", "8", "--batch", "4", "--steps", "2", "--ks", "1", "2", "4"], 300),
            ("Selection step, coarse noise patches", [
                "selection_step.py", *dev, "--backbone", "DiT-Tiny/2", "--rater", "dual_stream_shared", "--size", "8",
                "--rater-param", "noise_patch_size=4", "--batch", "4", "--steps", "2", "--ks", "1", "4"], 300),
            ("Meta step", ["meta_step.py", *dev, "--s-values", "1,2", "--engines", "unrolled-reverse,unrolled-mixed-db",
                           "--size", "8", "--batch", "2", "--k", "2", "--checkpointing", "both"], 300),
            ("Meta step: attention and precision", [
                "meta_step.py", *dev, "--s-values", "2", "--engines", "unrolled-reverse,unrolled-mixed", "--size", "8",
                "--batch", "2", "--k", "2", "--rater", "dual_stream_tiny", "--attention", "math,blocked",
                "--precision", "fp32,bf16"], 300),
        ]
    official = ["--official", args.official] if args.official else []
    setups = ["--setups", "fp32", "bf16", "bf16+compile"]
    selection = ["--size", "32", "--batch", "256", "--steps", "10", "--ks", "1", "2", "4", "8",
                 "--precision", "bf16", "--compile"]
    return [
        ("Training throughput: DiT-S/2", ["train_throughput.py", *dev, "--configs", "DiT-S/2", "--batch", "256",
                                          "--steps", "20", *setups, *official], 150),
        ("Training throughput: DiT-XL/2", ["train_throughput.py", *dev, "--configs", "DiT-XL/2", "--batch", "64",
                                           "--steps", "10", "--setups", "bf16", "bf16+compile", *official], 150),
        ("Selection step: the paper's rater", ["selection_step.py", *dev, "--rater", "dual_stream", *selection], 120),
        ("Selection step: dual_stream_shared", ["selection_step.py", *dev, "--rater", "dual_stream_shared",
                                                *selection], 120),
        ("Selection step: dual_stream_shared, noise_patch_size 4", [
            "selection_step.py", *dev, "--rater", "dual_stream_shared", "--rater-param", "noise_patch_size=4",
            *selection], 120),
        ("Meta step at the ImageNet recipe's per-GPU share", [
            "meta_step.py", *dev, "--model", "DiT-S/2", "--size", "32", "--batch", "8", "--k", "8",
            "--val-batch", "16", "--rater", "dual_stream", "--s-values", "1,5",
            "--engines", "unrolled-reverse,unrolled-mixed,unrolled-mixed-db,implicit,one_step",
            "--checkpointing", "both"], 300),
        ("Meta step: chunks 4 (as the paper recipes), then blocked attention and bf16, at the same share", [
            "meta_step.py", *dev, "--model", "DiT-S/2", "--size", "32", "--batch", "8", "--k", "8",
            "--val-batch", "16", "--rater", "dual_stream", "--s-values", "5", "--engines", "unrolled-reverse,unrolled-mixed",
            "--chunks", "4", "--attention", "math,blocked", "--precision", "fp32,bf16"], 240),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--official", default=None, help="the official DiT models.py, measured beside ours")
    ap.add_argument("--out", default="gpu_suite.md")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check the script, measure nothing")
    args = ap.parse_args()
    sections = [f"## GPU suite ({time.strftime('%Y-%m-%d')}, `python benchmarks/gpu_suite.py`)\n"]
    for title, (script, *rest), limit in parts(args):
        markdown = ["--markdown"] if script != "meta_step.py" else []
        cmd = [sys.executable, str(HERE / script), *rest, *markdown]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            body = proc.stdout.strip() if proc.returncode == 0 else (
                f"failed (exit code {proc.returncode}): {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            if script == "meta_step.py" and proc.returncode == 0:
                body = "```\n" + body + "\n```"
        except subprocess.TimeoutExpired:
            body = f"stopped after {limit} s"
        took = time.perf_counter() - start
        sections.append(f"### {title} ({took:.0f} s)\n\n`python benchmarks/{script} {' '.join(rest)}`\n\n{body}\n")
        print(sections[-1], flush=True)
    Path(args.out).write_text("\n".join(sections))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
