"""Start-up time of the command line: ``noisevalue --help`` and ``noisevalue plugins list``.

    python benchmarks/startup.py [--runs 5] [--check]

Each command runs in a fresh subprocess (``python -m noisevalue.cli ...`` with this
interpreter), so the figure is what a user waits for: interpreter start, imports and
entry-point discovery. Reported: the median wall time of ``--runs`` runs, and its ratio to
the 1 s target (below 1.00 meets it). ``--check`` adds ``plugins list --check``, which
imports every component and is not held to the target.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

TARGET_S = 1.0


def wall_times(args: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "noisevalue.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode not in (0, 2):  # --check exits 2 when a plugin fails: still timed
            raise SystemExit(f"noisevalue {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="Runs per command (median reported).")
    parser.add_argument("--check", action="store_true", help="Also time `plugins list --check`.")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    commands = [["--help"], ["plugins", "list"]] + ([["plugins", "list", "--check"]] if args.check else [])

    rows = []
    for command in commands:
        times = wall_times(command, args.runs)
        rows.append((" ".join(command), statistics.median(times), min(times), max(times)))

    print(f"python {sys.version.split()[0]}, median of {args.runs} runs in fresh subprocesses, "
          f"target {TARGET_S:.1f} s")
    print(f"{'noisevalue ...':<26} {'median s':>9} {'min s':>7} {'max s':>7} {'/ target':>9}")
    for name, median, low, high in rows:
        print(f"{name:<26} {median:>9.3f} {low:>7.3f} {high:>7.3f} {median / TARGET_S:>9.2f}")


if __name__ == "__main__":
    main()
