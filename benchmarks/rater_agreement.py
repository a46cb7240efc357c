"""How far two raters agree on which candidate noise to pick, on the same candidates.

    python benchmarks/rater_agreement.py RATER_A RATER_B [--baseline RATER_C] [--data digits]

Each RATER is a rater checkpoint (a run or step folder of ``noisevalue run workflow=meta_train``
or the protocol's ``rater/``). Both score the same groups: ``--groups`` training images of the
recipe's data, each with ``--k`` i.i.d. candidate noises at one uniformly drawn timestep
and its (possibly null) label, from a fixed seed. Printed per pair: the mean Spearman
correlation of the scores within a group (with a 95% interval over groups), and how often
both pick the same top-1 candidate (chance: 1/k). ``--baseline`` adds the pairs with a third
rater, e.g. the untrained one, as a reference for what agreement means.

Used for ``dual_stream_shared`` against the paper's rater, both meta-trained on the same
stage-(i) checkpoint (``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch

from noisevalue.config import load_recipe
from noisevalue.experiments.rater_stats import spearman
from noisevalue.raters import load_rater
from noisevalue.train.batches import seeded_generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raters", nargs=2)
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--recipe", default="digits")
    ap.add_argument("--groups", type=int, default=2000)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    recipe = load_recipe(args.recipe)
    from noisevalue import registry

    dataset = registry.build("dataset", recipe.data.dataset, where="data.dataset")
    encoder = registry.build("encoder", recipe.data.encoder, where="data.encoder")
    g = seeded_generator(args.seed, 0)
    idx = torch.randperm(len(dataset), generator=g)[: args.groups]
    images = torch.stack([dataset[int(i)][0] for i in idx])
    labels = torch.tensor([dataset[int(i)][1] for i in idx])
    with torch.no_grad():
        x0 = encoder.encode(images)
    t = torch.randint(0, recipe.diffusion.num_timesteps, (len(idx),), generator=g)
    noise = torch.randn(len(idx), args.k, *x0.shape[1:], generator=g)

    names = {"A": args.raters[0], "B": args.raters[1], **({"C": args.baseline} if args.baseline else {})}
    scores = {}
    for key, path in names.items():
        rater, where = load_rater(path)
        with torch.no_grad():
            if rater.grouped:
                scores[key] = rater(noise, t, x0, labels)
            else:
                flat = noise.flatten(0, 1)
                rep = lambda v: v.repeat_interleave(args.k, 0)  # noqa: E731
                scores[key] = rater(flat, rep(t), rep(x0), rep(labels)).reshape(len(idx), args.k)
        print(f"{key}: {where} ({type(rater).__name__}{', grouped' if rater.grouped else ''})")
    print(f"{len(idx)} groups of k={args.k} candidates, data '{recipe.data.dataset.name}', seed {args.seed}")
    print(f"{'pair':<6}{'Spearman':>10}{'95% interval':>20}{'same top-1':>12}{'chance':>8}")
    for a, b in itertools.combinations(scores, 2):
        rho = spearman(scores[a], scores[b]).double()
        rho = rho[~rho.isnan()]
        half = 1.96 * float(rho.std()) / math.sqrt(len(rho))
        top = float((scores[a].argmax(1) == scores[b].argmax(1)).double().mean())
        print(f"{a}-{b:<4}{float(rho.mean()):>10.3f}   [{float(rho.mean()) - half:+.3f}, "
              f"{float(rho.mean()) + half:+.3f}]{top:>12.3f}{1 / args.k:>8.3f}")


if __name__ == "__main__":
    main()
