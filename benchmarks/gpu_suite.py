"""One GPU, one run: the figures of ``docs/benchmarks.md`` in five minutes at most.

    python benchmarks/gpu_suite.py [--official path/to/DiT/models.py] [--out gpu_suite.md]
    python benchmarks/gpu_suite.py --device cpu --quick     # a check of the script itself

Each part runs in its own process, and measures what it compares side by side in that run
(seconds allowed in brackets):

1. first-run checks: ``benchmarks/gpu_checks.py --device DEVICE`` (``--quick`` added under
   ``--quick``), reported as "not present" when that file does not exist (60 s);
2. training throughput and MFU of DiT-S/2 (batch 256) on 32x32x4 latents, fp32 (TF32)
   against bf16 + ``torch.compile``, with the official ``models.py`` beside ours when
   ``--official`` names it (``train_throughput.py``; 75 s);
3. the selection step at k = 1 and 4 against its FLOP ratio, with the paper's rater
   (``dual_stream``) scoring in bf16, compiled as the ``rater`` selector compiles it, and the
   DiT compiled as the trainer compiles it (``selection_step.py``; 55 s);
4. the same with ``dual_stream_shared`` on coarser noise patches (``noise_patch_size=4``; 50 s);
5. one rater outer step at the paper recipes' per-GPU share, i.e. one inner loop of
   ``meta.subproblems: 16`` over ``meta.groups: 32`` x K=8 and ``meta.val_batch_size: 64``:
   2 groups x K=8, validation batch 4, in 2 chunks (``meta.chunks: 2``), DiT-S/2 and the
   paper's rater, S = 5, SGD inner optimizer, unrolled mixed mode; peak memory and the
   median time of 2 steps after a warm-up step (``meta_step.py``; 45 s);
6. the same step at the previous, larger share (8 groups x K=8, validation batch 16, in 4
   chunks), for comparison, with whatever is left of the budget (at least 15 s; more when
   the parts before it finish early).

The whole suite, process start-ups included, stops at ``--budget`` seconds (default 300,
which the limits above add up to; 900 with ``--quick``), and a part never gets more than
what is left of it. Each part's output is appended to ``--out`` (default ``gpu_suite.md``)
as soon as the part ends, and printed; a part that fails is reported with the last line of
its error, and a part stopped at its limit keeps the rows it printed, then "stopped after
N s". Each part's whole stdout and stderr are kept beside ``--out`` (``gpu_suite.logs/``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BUDGET_S = 300  # one H100, process start-ups included
START = time.monotonic()  # the budget counts from the suite's own start
HERE = Path(__file__).resolve().parent
MARKDOWN = {"train_throughput.py", "selection_step.py"}  # the scripts that print markdown tables


def parts(args: argparse.Namespace) -> list[tuple[str, list[str], int]]:
    """(title, command, seconds allowed) per part; 0 seconds: what is left of the budget."""
    dev = ["--device", args.device]
    meta = ["meta_step.py", *dev, "--s-values", "5", "--engines", "unrolled-mixed", "--inner-optimizer", "sgd",
            "--warmup", "1", "--repeats", "2"]
    share = ["--batch", "2", "--k", "8", "--val-batch", "4", "--chunks", "2"]
    old_share = ["--batch", "8", "--k", "8", "--val-batch", "16", "--chunks", "4"]
    if args.quick:  # tiny sizes: checks that every part runs, not a measurement
        tiny_meta = [*meta, "--model", "DiT-Tiny/2", "--size", "8", "--rater", "dual_stream_tiny"]
        return [
            ("First-run checks", ["gpu_checks.py", *dev, "--quick"], 120),
            ("Training throughput", ["train_throughput.py", *dev, "--configs", "DiT-Tiny/2", "--batch", "8",
                                     "--steps", "2", "--setups", "fp32", "bf16"], 120),
            ("Selection step: the paper's rater", [
                "selection_step.py", *dev, "--backbone", "DiT-Tiny/2", "--rater", "dual_stream_tiny", "--size", "8",
                "--batch", "4", "--steps", "2", "--ks", "1", "4"], 120),
            ("Selection step: dual_stream_shared, noise_patch_size 4", [
                "selection_step.py", *dev, "--backbone", "DiT-Tiny/2", "--rater", "dual_stream_shared", "--size", "8",
                "--rater-param", "noise_patch_size=4", "--batch", "4", "--steps", "2", "--ks", "1", "4"], 120),
            ("Meta step at the per-GPU share", [*tiny_meta, *share], 120),
            ("Meta step at the previous share", [*tiny_meta, *old_share], 0),
        ]
    official = ["--official", args.official] if args.official else []
    selection = ["--size", "32", "--batch", "256", "--steps", "5", "--ks", "1", "4", "--precision", "bf16", "--compile"]
    dit_s = ["--model", "DiT-S/2", "--size", "32", "--rater", "dual_stream"]
    full = [
        ("First-run checks", ["gpu_checks.py", *dev], 60),
        ("Training throughput: DiT-S/2", ["train_throughput.py", *dev, "--configs", "DiT-S/2", "--batch", "256",
                                          "--steps", "10", "--setups", "fp32", "bf16+compile", *official], 75),
        ("Selection step: the paper's rater", ["selection_step.py", *dev, "--rater", "dual_stream", *selection], 55),
        ("Selection step: dual_stream_shared, noise_patch_size 4", [
            "selection_step.py", *dev, "--rater", "dual_stream_shared", "--rater-param", "noise_patch_size=4",
            *selection], 50),
        ("Meta step at the paper recipes' per-GPU share (meta.subproblems 16, meta.chunks 2)",
         [*meta, *dit_s, *share], 45),
        ("Meta step at the previous share (8 groups x K=8, validation batch 16, 4 chunks), for comparison",
         [*meta, *dit_s, *old_share], 0),
    ]
    assert sum(limit for *_, limit in full) <= BUDGET_S - 15, "the last part's share of the budget"
    return full


def run_part(cmd: list[str], limit: float, stdout: Path, stderr: Path) -> int | None:
    """The part's exit code, or None when it was stopped at ``limit`` seconds. Its output goes
    to files as it is printed, so that a stopped part keeps what it measured."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with stdout.open("w") as out, stderr.open("w") as err:
        # a session of its own: on timeout the part's children (meta_step.py's per-configuration
        # processes, the compiler's workers) are stopped with it
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--official", default=None, help="the official DiT models.py, measured beside ours")
    ap.add_argument("--out", default="gpu_suite.md")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole suite, start-ups included (default 300; 900 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check the script, measure nothing")
    args = ap.parse_args()
    budget = args.budget or (900.0 if args.quick else float(BUDGET_S))
    deadline = START + budget
    out = Path(args.out)
    logs = out.with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    title = (f"## GPU suite ({time.strftime('%Y-%m-%d')}, `python benchmarks/gpu_suite.py"
             f"{' --quick' if args.quick else ''}`, device {args.device}, budget {budget:.0f} s)\n")
    out.write_text(title + "\n")
    print(title, flush=True)
    for i, (title, (script, *rest), limit) in enumerate(parts(args), 1):
        left = deadline - time.monotonic()
        allowed = left if limit == 0 else min(limit, left)
        shown = f"`python benchmarks/{script} {' '.join(rest)}`"
        if not (HERE / script).exists():
            body, took = "not present", 0.0
        elif allowed < 1:
            body, took = f"skipped: the suite's budget of {budget:.0f} s is spent", 0.0
        else:
            cmd = [sys.executable, str(HERE / script), *rest, *(["--markdown"] if script in MARKDOWN else [])]
            stdout, stderr = logs / f"{i}.stdout", logs / f"{i}.stderr"
            start = time.monotonic()
            code = run_part(cmd, allowed, stdout, stderr)
            took = time.monotonic() - start
            body = stdout.read_text().strip()
            if body and script not in MARKDOWN:
                body = "```\n" + body + "\n```"
            if code is None:
                body = (body + "\n\n" if body else "") + f"stopped after {allowed:.0f} s"
            elif code:
                last = (stderr.read_text().strip().splitlines() or ["?"])[-1]
                body = (body + "\n\n" if body else "") + f"failed (exit code {code}): {last}"
        section = f"### {i}. {title} ({took:.0f} s)\n\n{shown}\n\n{body}\n\n"
        with out.open("a") as f:  # as each part ends: a suite stopped part-way keeps its parts
            f.write(section)
        print(section, flush=True)
    print(f"written: {out} ({time.monotonic() - START:.0f} s in all)")


if __name__ == "__main__":
    main()
