"""Regenerate the example outputs in the command pages of these docs from the digits default.

    python docs/make_examples.py                 # all commands, outputs under runs/digits
    python docs/make_examples.py analyze eval    # only some (ablate-seeds: ablate over 3 seeds)
    python docs/make_examples.py protocol powered signal   # the NoiseRater page
    python docs/make_examples.py powered32       # digits32 over 20 seeds, under runs/digits32

Each command runs exactly as a user would type it (stages already on disk are reused). The
tables are pasted into ``docs/<command>.md`` between ``<!-- example: NAME -->`` and
``<!-- /example: NAME -->``, the figures copied into ``docs/figures/``, with the wall time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent
FIGURES = DOCS / "figures"
RUN = Path("runs/digits")
RUN32 = Path("runs/digits32")
COMMANDS = ("protocol", "powered", "powered32", "signal", "ablate", "ablate-seeds", "transfer", "analyze", "sample", "eval",
            "compare")
# the methods of `compare` (the neighbour plugins must be installed: pip install ./plugins/*)
COMPARE_METHODS = ("rater", "max_norm", "min_norm", "min_snr", "p2", "immiscible", "immiscible_knn", "infonoise")
COMPARE_SEEDS = "select.seeds=[0,1]"
POWERED_SEEDS = list(range(20))
# the inner optimizers compared by `signal`, each with its learning rate on digits
INNER_OPTIMIZERS = (("sgd", "0.01"), ("adamw_checkpoint", "0.001"), ("adamw_fresh", "0.001"))


def noisevalue(*args: str) -> tuple[str, float]:
    """Run the CLI; returns its output and wall time in seconds."""
    cmd = [sys.executable, "-m", "noisevalue.cli", *args]
    print("$ noisevalue " + " ".join(args), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"noisevalue {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout, elapsed


def figure(path: Path, name: str) -> str:
    FIGURES.mkdir(exist_ok=True)
    shutil.copyfile(path, FIGURES / name)
    return f"![{name}](figures/{name})"


def paste(page: str, name: str, body: str) -> None:
    path = DOCS / page
    text = path.read_text()
    start, end = f"<!-- example: {name} -->", f"<!-- /example: {name} -->"
    if start not in text:
        sys.exit(f"{path}: no '{start}' marker to paste the example after")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1] if end in rest else rest
    path.write_text(f"{head}{start}\n{body.strip()}\n{end}{tail}")
    print(f"  -> {path.relative_to(DOCS.parent)}")


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def reused(*stages: str, run: Path | None = None) -> str:
    """Which shared stages of ``run`` (the default's: RUN) were on disk before the command
    ran (read before running it)."""
    done = [s for s in stages if ((run or RUN) / s / "DONE").is_file()]
    if not done:
        return "from scratch"
    return "with " + " and ".join(done) + " already done"


def protocol() -> None:
    before = reused("pretrain", "rater")
    _, t = noisevalue("run")
    paste("noiserater.md", "protocol", f"""
`noisevalue run` ({minutes(t)} on 2 CPU cores, {before}):

{(RUN / "comparison.md").read_text()}
{figure(RUN / "comparison.png", "comparison.png")}

{(RUN / "comparison_noise.md").read_text()}
""")


def powered() -> None:
    """The default protocol over 20 seeds; seed 0's stages are the default run's."""
    _powered(RUN, (), "powered", "comparison_seeds.png")


def powered32() -> None:
    """The digits32 protocol over the same 20 seeds."""
    _powered(RUN32, ("digits32",), "powered32", "comparison_digits32_seeds.png")


def _powered(run: Path, recipe: tuple[str, ...], name: str, figure_name: str) -> None:
    """A recipe's protocol over :data:`POWERED_SEEDS`, its tables pasted as example ``name``."""
    seeds = "select.seeds=[" + ",".join(str(s) for s in POWERED_SEEDS) + "]"
    before = reused("pretrain", "rater", run=run)
    _, t = noisevalue("run", *recipe, seeds)
    paste("noiserater.md", name, f"""
`noisevalue run {"".join(r + " " for r in recipe)}'{seeds}'` ({minutes(t)} on 2 CPU cores, {before}):

{(run / "comparison.md").read_text()}
{figure(run / "comparison.png", figure_name)}

{(run / "comparison_noise.md").read_text()}
""")


def signal() -> None:
    """analyze --signal for each inner optimizer, all on the default run's stage (i)."""
    if not (RUN / "pretrain" / "DONE").is_file():
        noisevalue("run", "workflow=pretrain", f"output_dir={RUN / 'pretrain'}")
    parts = []
    for name, lr in INNER_OPTIMIZERS:
        out = RUN.parent / f"digits-inner-{name}"
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "pretrain").exists():  # share stage (i): only the rater differs
            (out / "pretrain").symlink_to((RUN / "pretrain").resolve(), target_is_directory=True)
        _, t = noisevalue("analyze", "--signal", f"output_dir={out}", f"meta.inner_optimizer={name}",
                          f"meta.inner_lr={lr}")
        body = (out / "analyze" / "signal" / "signal.md").read_text().split("\n", 1)[1]
        body = body.replace("\n## ", "\n##### ")  # nested under the page's sections
        parts.append(f"#### `meta.inner_optimizer={name} meta.inner_lr={lr}` ({minutes(t)})\n{body}")
        png = "signal.png" if name == INNER_OPTIMIZERS[0][0] else f"signal_{name}.png"
        parts.append(figure(out / "analyze" / "signal" / "signal.png", png))
    paste("noiserater.md", "signal", "\n".join(parts))


def ablate() -> None:
    before = reused("pretrain", "rater")
    _, t = noisevalue("ablate")
    out = RUN / "ablate"
    paste("ablate.md", "ablate", f"""
`noisevalue ablate` (all variants; {minutes(t)} on 2 CPU cores, {before}):

{(out / "ablation.md").read_text()}
{figure(out / "ablation.png", "ablation.png")}
""")


def ablate_seeds() -> None:
    """The same ablation over three seeds: seed 0's runs are reused, seeds 1 and 2 added."""
    before = reused("pretrain", "rater")
    _, t = noisevalue("ablate", "select.seeds=[0,1,2]")
    out = RUN / "ablate"
    paste("ablate.md", "ablate-seeds", f"""
`noisevalue ablate select.seeds=[0,1,2]` ({minutes(t)} on 2 CPU cores, {before}, seed 0's runs reused):

{(out / "ablation.md").read_text()}
{figure(out / "ablation.png", "ablation_seeds.png")}
""")


def transfer() -> None:
    before = reused("pretrain", "rater")
    _, t = noisevalue("transfer")
    out = RUN / "transfer"
    paste("transfer.md", "transfer", f"""
`noisevalue transfer` ({minutes(t)} on 2 CPU cores, {before}):

{(out / "matching.md").read_text()}
{figure(out / "loss_curves.png", "transfer_loss_curves.png")}

{(out / "transfer.md").read_text()}
{figure(out / "transfer.png", "transfer.png")}
""")


def analyze() -> None:
    before = reused("pretrain")
    _, t = noisevalue("analyze")
    out = RUN / "analyze"
    paste("analyze.md", "analyze", f"""
`noisevalue analyze` (checkpoints 0, 500 and 1500; {minutes(t)} on 2 CPU cores, {before}):

{(out / "summary.md").read_text()}
{figure(out / "by_stage.png", "analyze_by_stage.png")}
{figure(out / "by_timestep.png", "analyze_by_timestep.png")}
""")


def sample() -> None:
    out = RUN / "docs-samples"
    shutil.rmtree(out, ignore_errors=True)
    printed, t = noisevalue("sample", str(RUN / "pretrain"), "--num", "400", "--out", str(out))
    import numpy as np

    arr = np.load(out / "samples.npz")["arr_0"]
    grid = sorted(out.glob("*.png"))[0]
    paste("sample.md", "sample", f"""
`noisevalue sample {RUN / "pretrain"} --num 400 --out {out}` ({t:.0f} s on 2 CPU cores):

```
{printed.strip()}
```

`samples.npz`: `arr_0` {arr.dtype} {tuple(arr.shape)} (NHWC).

{figure(grid, "sample_grid.png")}
""")


def eval_() -> None:
    npz = RUN / "docs-samples" / "samples.npz"
    if not npz.is_file():
        sample()
    printed, t = noisevalue("eval", str(npz), "--reference", "digits")
    result = json.loads((npz.parent / "eval.json").read_text())
    paste("eval.md", "eval", f"""
`noisevalue eval {npz} --reference digits` ({t:.0f} s on 2 CPU cores):

```
{printed.strip()}
```

`eval.json`:

```json
{json.dumps(result, indent=2)}
```
""")


def compare() -> None:
    before = reused("pretrain", "rater", "rater-seed1")
    args = [f"output_dir={RUN}", COMPARE_SEEDS, *(a for m in COMPARE_METHODS for a in ("--method", m))]
    _, t = noisevalue("compare", *args)
    paste("compare.md", "compare", f"""
`noisevalue compare '{COMPARE_SEEDS}' {' '.join(f'--method {m}' for m in COMPARE_METHODS)}`
({minutes(t)} on 2 CPU cores, {before}):

{(RUN / "compare.md").read_text()}
{(RUN / "compare_timings.md").read_text()}
{figure(RUN / "compare.png", "compare.png")}
""")


def main(argv: list[str]) -> None:
    chosen = argv or list(COMMANDS)
    unknown = [c for c in chosen if c not in COMMANDS]
    if unknown:
        sys.exit(f"unknown command {unknown[0]}; choose from {', '.join(COMMANDS)}")
    for name in chosen:
        {"protocol": protocol, "powered": powered, "powered32": powered32, "signal": signal, "ablate": ablate,
         "ablate-seeds": ablate_seeds, "transfer": transfer, "analyze": analyze, "sample": sample,
         "eval": eval_, "compare": compare}[name]()


if __name__ == "__main__":
    main(sys.argv[1:])
