"""Host memory of one evaluation against its number of samples: flat, because no image set
is ever held whole.

    python benchmarks/eval_memory.py [--work DIR] [--sizes 2000 20000] [--markdown]

One evaluation as a run makes it (:class:`noisevalue.train.evaluate.Evaluation`: the sample
grid, the held-out loss, the reference statistics of ``eval.num_samples`` reference images
and the Fréchet distance of ``eval.num_samples`` generated ones), with tiny networks: a
random ``DiT-Tiny/2`` on 4x8x8 latents, a tiny random VAE decoding to 64x64 RGB, and a small
convolutional feature extractor in place of Inception (the same ``FIDEvaluator`` engine).
The reference is an image folder of 64x64 PNGs as large as the largest size. Each size runs
in its own process; the peak resident set (``VmHWM``, reset just before the evaluation) is
reported as its growth over the resident set before the evaluation and as the absolute
peak, with the ratios of the largest size to the smallest. The target is a ratio of at most
1.15 between 2,000 and 20,000 samples.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def measure(work: Path, samples: int) -> dict:
    import torch
    from torch import nn

    from noisevalue import registry
    from noisevalue.config import load_recipe
    from noisevalue.diffusion import Diffusion
    from noisevalue.distributed import DistInfo
    from noisevalue.evaluators.fid import FIDEvaluator
    from noisevalue.train.evaluate import Evaluation

    torch.set_num_threads(2)

    class Features(nn.Module):
        num_features = 64

        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 16, 4, 4), nn.ReLU(), nn.Conv2d(16, 64, 4, 4), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    recipe = load_recipe("imagenet_cond", [
        f"data.dataset.params.root={work / 'images'}", "data.dataset.params.image_size=64",
        f"data.eval_dataset.params.root={work / 'images'}", "data.eval_dataset.params.image_size=64",
        f"data.encoder.params.local_path={work / 'vae'}", "model.name=DiT-Tiny/2", f"eval.num_samples={samples}",
        "eval.loss_images=200", "eval.loss_draws=2", "sample.num_steps=2", "sample.batch_size=125",
        "sample.per_class=2", "train.device=cpu",
    ])
    encoder = registry.build("encoder", recipe.data.encoder, where="data.encoder")
    torch.manual_seed(0)
    model = registry.build("backbone", registry.Named("DiT-Tiny/2", {"input_size": 8, "in_channels": 4,
                                                                     "num_classes": 10}), where="model").eval()
    torch.manual_seed(0)
    evaluator = FIDEvaluator(feature_extractor=Features(), batch_size=125)  # keeps no cache: computed here
    evaluation = Evaluation(recipe, [evaluator], DistInfo(), encoder, (4, 8, 8), 10, Diffusion())
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what building freed is not counted as held
    before = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    evaluation.grid(model)
    metrics = evaluation.metrics(model)
    return {"samples": samples, "before_kib": before, "peak_kib": rss_kib("VmHWM"), "metrics": metrics}


def prepare(work: Path, images: int) -> None:
    from rehearsal import make_images, make_vae

    if not (work / "images").is_dir():
        make_images(work / "images", images, 64)
    if not (work / "vae").is_dir():
        make_vae(work / "vae")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("eval_memory"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a measuring subprocess
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.work, args.one)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work, max(args.sizes))
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--one", str(n)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{n} samples: {(row['peak_kib'] - row['before_kib']) / 1024:.0f} MiB over the "
              f"{row['before_kib'] / 1024:.0f} MiB before, peak {row['peak_kib'] / 1024:.0f} MiB", flush=True)
    first, last = rows[0], rows[-1]
    growth = (last["peak_kib"] - last["before_kib"]) / max(first["peak_kib"] - first["before_kib"], 1)
    peak = last["peak_kib"] / first["peak_kib"]
    print(f"ratio {last['samples']} / {first['samples']} samples: growth {growth:.2f}, peak {peak:.2f} (target <= 1.15)")
    if args.markdown:
        print("\n| samples | resident before MiB | peak MiB | growth MiB |\n|---|---|---|---|")
        for row in rows:
            print(f"| {row['samples']} | {row['before_kib'] / 1024:.0f} | {row['peak_kib'] / 1024:.0f} | "
                  f"{(row['peak_kib'] - row['before_kib']) / 1024:.0f} |")


if __name__ == "__main__":
    main()
