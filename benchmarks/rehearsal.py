"""A rehearsal of the paper's recipe at its own process counts, on the CPU.

    python benchmarks/rehearsal.py [--work DIR] [--procs 4] [--reuse]
    python benchmarks/rehearsal.py --small          # the CI-sized version (tests/test_rehearsal.py)

The shipped ``imagenet_cond`` recipe, changed in sizes only: ``DiT-Tiny/2``; a generated
64x64 image folder of 2,000 training and 1,000 held-out images in 10 classes; a tiny
randomly initialised VAE saved with ``save_pretrained`` (the real loading code reads it);
random Inception weights in the real file format; the FID reference computed from the
held-out images (the recipe's default, ADM's precomputed statistics, would skip that shared
work); ``eval.num_samples`` 2,000 and ``eval.loss_images`` 500; short stages, fewer DDIM
steps, a tiny rater. It runs

1. in one process,
2. under ``--nproc-per-node N`` (gloo),
3. as ``--nnodes 2 --nproc-per-node N/2`` with two launcher processes on the loopback
   address, as on two machines,

each once as an evaluation of the same initial weights (``workflow=pretrain
train.steps=0``: the metrics must equal the one-process ones to 1e-6 relative, by design)
and once as the whole protocol (every stage must complete; the metrics differ from one
process's by float summation order only, reported). Reported: each process's peak resident
memory (``VmHWM``, polled), each stage's evaluation time (``eval/seconds`` of its
``timings.jsonl``) and the runs' wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

SIZES = {
    # name: (train images, held-out images, image size, eval.num_samples, eval.loss_images,
    #        pretrain steps, continuation steps, meta outer steps, DDIM steps)
    "full": (2000, 1000, 64, 2000, 500, 40, 20, 4, 20),
    "small": (160, 80, 32, 48, 40, 4, 2, 2, 2),
}


# ---------------------------------------------------------------- stand-ins
def make_images(root: Path, count: int, size: int, classes: int = 10, seed: int = 0) -> None:
    """``count`` RGB images in ``classes`` folders: a class colour, a random blob, noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        c = i % classes
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array([(c * 37) % 256, (c * 91) % 256, (c * 157) % 256], dtype=np.float64)
        cy, cx, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.1, 0.3)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)[..., None]
        image = np.where(blob, colour, 255 - colour) + rng.normal(0, 12, (size, size, 3))
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.png")


def make_vae(path: Path) -> None:
    """A tiny ``AutoencoderKL`` with the real VAE's factor 8 and 4 latent channels."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=64,
    )
    vae.save_pretrained(path)  # type: ignore[attr-defined]


def make_inception(path: Path) -> None:
    """The FID InceptionV3 of torch-fidelity with random weights, saved as its state dict:
    the format of ``weights-inception-2015-12-05-6726825d.pth``."""
    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    original = (fe.FeatureExtractorInceptionV3.load_state_dict, fe.torch.load)
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd: None  # type: ignore[method-assign]
    fe.torch.load = lambda *args, **kwargs: {}  # type: ignore[assignment]
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("stand-in", ["2048"], "unused")
    finally:
        fe.FeatureExtractorInceptionV3.load_state_dict, fe.torch.load = original  # type: ignore[method-assign]
    # a He-style gain, so random activations do not vanish over ~50 layers
    state = {k: v * 2.45 if k.endswith("conv.weight") else v for k, v in net.state_dict().items()}
    torch.save(state, path)


def make_standins(work: Path, size: str) -> None:
    train, held_out, pixels, *_ = SIZES[size]
    if not (work / "images").is_dir():
        make_images(work / "images", train, pixels)
        make_images(work / "val", held_out, pixels, seed=1)
    if not (work / "vae").is_dir():
        make_vae(work / "vae")
    if not (work / "inception.pth").is_file():
        make_inception(work / "inception.pth")


def overrides(work: Path, size: str) -> list[str]:
    """``imagenet_cond`` changed in sizes only, pointing at the stand-ins."""
    _, _, pixels, samples, loss_images, steps, select_steps, outer, ddim = SIZES[size]
    return [
        f"data.dataset.params.root={work / 'images'}", f"data.dataset.params.image_size={pixels}",
        f"data.eval_dataset.params.root={work / 'val'}", f"data.eval_dataset.params.image_size={pixels}",
        f"data.encoder.params.local_path={work / 'vae'}", "data.cache_shard_size=256", "data.encode_batch_size=64",
        f"eval.evaluators.0.params.weights_path={work / 'inception.pth'}",
        "~eval.evaluators.0.params.reference_stats",  # the reference computed from the stand-in images, shared
        "model.name=DiT-Tiny/2", f"eval.num_samples={samples}", f"eval.loss_images={loss_images}",
        "eval.loss_draws=2", f"train.steps={steps}", "train.global_batch_size=32",
        f"train.ckpt_every={steps}", "train.log_every=2", "train.device=cpu", "train.threads=1",
        f"sample.num_steps={ddim}", "sample.per_class=2", "sample.batch_size=25",
        f"meta.outer_steps={outer}", "meta.log_every=2", f"meta.ckpt_every={outer}", "meta.inner_steps=2",
        "rater.params={hidden_size: 32, depth: 2, num_heads: 2, patch_size: 2}",
        f"select.steps={select_steps}", f"select.eval_every={select_steps}",
    ]


# ---------------------------------------------------------------- runs
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PeakMemory:
    """Polls the ``VmHWM`` of every process below ``roots`` (the launchers), labelled by
    the ``RANK`` in their environment: each process's peak resident memory."""

    def __init__(self, roots: list[subprocess.Popen], every: float = 0.5) -> None:
        self.roots, self.every = roots, every
        self.peaks: dict[int, tuple[str, int]] = {}  # pid -> (label, KiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _children(self) -> dict[int, list[int]]:
        tree: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as fh:
                        parent = int(fh.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
                tree.setdefault(parent, []).append(int(entry))
        return tree

    def _poll(self) -> None:
        while not self._stop.is_set():
            tree = self._children()
            todo = [(p.pid, f"launcher {i}") for i, p in enumerate(self.roots)]
            while todo:
                pid, label = todo.pop()
                try:
                    with open(f"/proc/{pid}/status") as fh:
                        hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
                    with open(f"/proc/{pid}/environ", "rb") as fh:
                        env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
                except (OSError, StopIteration):
                    continue
                if b"RANK" in env:  # a worker that torch.distributed.run started (or its helper)
                    label = f"rank {int(env[b'RANK'])}"
                self.peaks[pid] = (label, max(hwm, self.peaks.get(pid, ("", 0))[1]))
                todo += [(child, label) for child in tree.get(pid, [])]
            self._stop.wait(self.every)

    def by_label(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for label, kib in self.peaks.values():
            out[label] = max(out.get(label, 0), kib)
        return out


def launch(work: Path, name: str, extra: list[str], size: str, layout: tuple[int, int],
           env: dict[str, str], resume: bool = False) -> tuple[float, dict[str, int], Path]:
    """``noisevalue run imagenet_cond`` into ``work/name`` on ``nodes x per_node`` processes;
    from scratch, or (``resume``) on from what an interrupted launch left there."""
    nodes, per_node = layout
    out = work / name
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
    base = [sys.executable, "-m", "noisevalue.cli", "run", "imagenet_cond", *overrides(work, size), *extra,
            f"output_dir={out}"]
    if nodes == 1:
        commands = [base + (["--nproc-per-node", str(per_node)] if per_node > 1 else [])]
    else:
        endpoint = f"127.0.0.1:{free_port()}"
        commands = [base + ["--nproc-per-node", str(per_node), "--nnodes", str(nodes), "--node-rank", str(r),
                            "--rdzv-endpoint", endpoint, "--rdzv-id", name] for r in range(nodes)]
    start = time.perf_counter()
    logs = [open(work / f"{name}.node{i}.log", "a" if resume else "w") for i in range(len(commands))]  # noqa: SIM115
    procs = [subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT, env=env) for c, log in
             zip(commands, logs, strict=True)]
    with PeakMemory(procs) as memory:
        codes = [p.wait() for p in procs]
    for log in logs:
        log.close()
    took = time.perf_counter() - start
    if any(codes):
        tail = (work / f"{name}.node0.log").read_text().strip().splitlines()[-15:]
        raise SystemExit(f"{name}: exit codes {codes}\n" + "\n".join(tail))
    return took, memory.by_label(), out


def stage_metrics(out: Path) -> dict[str, dict[str, float]]:
    """The final metrics of every stage folder below ``out`` that evaluates."""
    found = {}
    for path in sorted(out.rglob("metrics.json")):
        found[str(path.parent.relative_to(out)) or "."] = json.loads(path.read_text())["metrics"]
    return found


def eval_seconds(out: Path) -> dict[str, float]:
    times: dict[str, float] = {}
    for path in sorted(out.rglob("timings.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        total = sum(row.get("eval/seconds", 0.0) for row in rows)
        if total:
            times[str(path.parent.relative_to(out)) or "."] = total
    return times


def weight_difference(one: Path, other: Path) -> float:
    """The largest ``|a - b| / |a|`` (all of a checkpoint's tensors as one vector) over every
    stage's newest checkpoint (model weights; rater weights for the rater stages). One
    vector, not tensor by tensor: a parameter whose gradient is zero but for round-off (the
    rater head's bias: scores are compared within a group) takes AdamW steps of either sign."""
    import torch
    from safetensors.torch import load_file

    worst = 0.0
    for latest in sorted(one.rglob("checkpoints/latest")):
        ckpt = latest.parent / latest.read_text().strip()
        for name in ("model", "rater"):
            path = ckpt / f"{name}.safetensors"
            if not path.is_file():
                continue
            a, b = load_file(str(path)), load_file(str(other / path.relative_to(one)))
            keys = [k for k, v in a.items() if v.is_floating_point()]
            diff = torch.cat([(a[k] - b[k]).double().flatten() for k in keys]).norm()
            worst = max(worst, float(diff / torch.cat([a[k].double().flatten() for k in keys]).norm()))
    return worst


def max_relative(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per metric, the largest |a - b| / |a| over the stages both hold."""
    worst: dict[str, float] = {}
    for stage in a.keys() & b.keys():
        for key in a[stage].keys() & b[stage].keys():
            x, y = a[stage][key], b[stage][key]
            worst[key] = max(worst.get(key, 0.0), abs(x - y) / max(abs(x), 1e-300))
    return worst


def rehearse(work: Path, size: str = "full", procs: int = 4, say=print, reuse: bool = False) -> dict:
    """Every layout, evaluation-only then the protocol; returns the figures. Each finished run
    leaves its figures in ``work/<run>.json``. With ``reuse``, a run that has them is not
    launched again, and one that was interrupted resumes (``noisevalue run`` skips its finished
    stages): its wall time and peaks are then those of the resumed launch only, and its row
    says so; its evaluation time (from ``timings.jsonl``) is still the whole run's."""
    work.mkdir(parents=True, exist_ok=True)
    make_standins(work, size)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", NOISEVALUE_CACHE=str(work / "cache"))
    layouts = {"1 process": (1, 1), f"{procs} processes": (1, procs), f"2 x {procs // 2} processes": (2, procs // 2)}
    report: dict = {"layouts": list(layouts), "eval_only": {}, "protocol": {}}
    for kind, extra in (("eval_only", ["workflow=pretrain", "train.steps=0"]), ("protocol", [])):
        for label, layout in layouts.items():
            name = f"{kind}-{layout[0]}x{layout[1]}"
            record = work / f"{name}.json"
            if reuse and record.is_file():
                report[kind][label] = json.loads(record.read_text())
                say(f"{kind}, {label}: figures of the finished run in {record}")
                continue
            resumed = reuse and (work / name).is_dir()
            if not resumed:
                shutil.rmtree(work / "cache", ignore_errors=True)  # each layout computes its reference itself
            took, memory, out = launch(work, name, extra, size, layout, env, resume=resumed)
            row: dict = {"wall_s": took, "peak_kib": memory, "metrics": stage_metrics(out),
                         "eval_s": eval_seconds(out), "out": str(out), "resumed": resumed}
            report[kind][label] = row
            record.write_text(json.dumps(row, indent=2))
            say(f"{kind}, {label}: {took:.0f} s, eval {sum(row['eval_s'].values()):.0f} s, peak "
                + ", ".join(f"{k} {v / 1024:.0f} MiB" for k, v in sorted(memory.items())))
        one = report[kind]["1 process"]
        for label in list(layouts)[1:]:
            row = report[kind][label]
            row["max_rel_diff"] = max_relative(one["metrics"], row["metrics"])
            row["weights_rel_diff"] = weight_difference(Path(one["out"]), Path(row["out"]))
    return report


def markdown(report: dict) -> str:
    lines = ["| run | layout | wall s | evaluation s | peak resident MiB per process | largest relative difference to 1 process: metrics; checkpoint weights |",
             "|---|---|---|---|---|---|"]
    for kind, title in (("eval_only", "evaluation of the initial weights"), ("protocol", "the protocol")):
        for label, row in report[kind].items():
            peaks = ", ".join(f"{k}: {v / 1024:.0f}" for k, v in sorted(row["peak_kib"].items()))
            diff = row.get("max_rel_diff")
            shown = "—" if diff is None else ", ".join(f"{k} {v:.1e}" for k, v in sorted(diff.items()) if "baseline" not in k)
            if "weights_rel_diff" in row:
                shown += f"; weights {row['weights_rel_diff']:.1e}"
            wall = f"{row['wall_s']:.0f}" + (" (resumed launch only)" if row.get("resumed") else "")
            lines.append(f"| {title} | {label} | {wall} | {sum(row['eval_s'].values()):.0f} | {peaks} | {shown} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("rehearsal"))
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--small", action="store_true", help="the CI-sized version")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the figures of finished runs in --work, resume an interrupted one")
    args = ap.parse_args()
    report = rehearse(args.work, "small" if args.small else "full", args.procs, reuse=args.reuse)
    (args.work / "report.json").write_text(json.dumps(report, indent=2))
    print(markdown(report))
    worst = max((v for row in report["eval_only"].values() for v in row.get("max_rel_diff", {}).values()), default=0.0)
    print(f"evaluation of the same weights: largest relative difference to one process {worst:.1e} "
          f"({'within' if worst <= 1e-6 else 'OVER'} 1e-6)")


if __name__ == "__main__":
    main()
