"""``noisevalue analyze`` (paper section 5.3): the statistics, the timestep mapping, and the
command end to end at a tiny size (reuse, explicit checkpoints, a missing step)."""

import csv
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import stats
from typer.testing import CliRunner

from noisevalue.cli import app
from noisevalue.experiments.rater_stats import (
    average_ranks,
    discrete_timestep,
    discrete_timesteps,
    score_std,
    spearman,
    summarize,
)

runner = CliRunner()

TINY_ANALYZE = [
    "train.steps=4", "train.global_batch_size=8", "train.ckpt_every=2", "train.keep_every=2",
    "train.log_every=1", "train.threads=1", "eval.evaluators=[]", "sample.num_steps=2", "sample.per_class=1",
    "eval.loss_draws=2", "eval.loss_images=24",
    "rater={name: dual_stream_tiny, params: {hidden_size: 32, depth: 1, num_heads: 2}}",
    "meta.inner_steps=1", "meta.groups=2", "meta.group_size=2", "meta.val_batch_size=4",
    "analyze.outer_steps=2", "analyze.num_images=4", "analyze.candidates=5",
    "analyze.timesteps=[0.0,0.5,1.0]",
]
STEPS, IMAGES, CANDIDATES, TIMESTEPS = [0, 2, 4], 4, 5, [0.0, 0.5, 1.0]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------- statistics
def test_spearman_and_std_match_scipy_and_numpy_with_ties_and_a_constant_row():
    g = np.random.default_rng(0)
    scores = g.normal(size=(40, 16))
    scores[:10] = g.integers(0, 4, size=(10, 16))  # many ties
    scores[10] = 3.0  # a constant row: Spearman undefined
    norms = g.normal(size=(40, 16))
    norms[11] = g.integers(0, 3, size=16)  # ties on the other side too
    rho = spearman(torch.from_numpy(scores), torch.from_numpy(norms)).numpy()
    for i in range(40):
        if i == 10:
            assert math.isnan(rho[i])
            continue
        expected = stats.spearmanr(scores[i], norms[i]).statistic
        assert rho[i] == pytest.approx(expected, abs=1e-12), i
    std = score_std(torch.from_numpy(scores)).numpy()
    np.testing.assert_allclose(std, np.std(scores, axis=-1, ddof=1), rtol=1e-12)
    assert std[10] == 0.0
    np.testing.assert_allclose(score_std(torch.from_numpy(scores), ddof=0).numpy(), np.std(scores, axis=-1))
    # vectorised over leading dimensions, norms broadcast over timesteps
    cube = torch.from_numpy(scores[:12].reshape(3, 4, 16))
    shared = torch.from_numpy(norms[:3])[:, None, :]
    np.testing.assert_allclose(
        spearman(cube, shared).numpy()[1, 2], stats.spearmanr(scores[6], norms[1]).statistic, atol=1e-12
    )


def test_average_ranks_of_ties():
    ranks = average_ranks(torch.tensor([[10.0, 20.0, 10.0, 30.0, 20.0, 20.0]]))
    assert ranks.tolist() == [[1.5, 4.0, 1.5, 6.0, 4.0, 4.0]]


def test_summary_excludes_and_counts_undefined_values():
    s = summarize([1.0, math.nan, 2.0, 3.0, 4.0, math.nan])
    assert (s["count"], s["undefined"]) == (4, 2)
    assert (s["mean"], s["median"], s["q1"], s["q3"]) == (2.5, 2.5, 1.75, 3.25)
    empty = summarize([math.nan])
    assert empty["count"] == 0 and math.isnan(empty["median"])


def test_timestep_mapping():
    assert discrete_timesteps([0.0, 0.1, 0.5, 0.6, 0.7, 1.0], 1000) == [0, 100, 500, 599, 699, 999]
    assert discrete_timestep(0.5, 10) == 5  # 4.5 rounds half up
    assert discrete_timestep(0.25, 3) == 1  # 0.5 rounds half up
    with pytest.raises(ValueError):
        discrete_timestep(1.5, 1000)


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze") / "run"
    result = invoke("analyze", *TINY_ANALYZE, "analyze.steps=[0,2,4]", f"output_dir={out}")
    assert result.exit_code == 0, (result.output, result.exception)
    return out


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_analyze_writes_one_row_per_checkpoint_image_timestep_and_recomputes(analyzed):
    from noisevalue.experiments.analyze import STREAM_ANALYZE_NOISE
    from noisevalue.raters import load_rater
    from noisevalue.registry import create
    from noisevalue.train.batches import seeded_generator

    root = analyzed / "analyze"
    for name in ("scores_stats.csv", "summary.csv", "summary.md", "by_timestep.png", "by_stage.png"):
        assert (root / name).is_file(), name
    rows = read_rows(root / "scores_stats.csv")
    assert len(rows) == len(STEPS) * IMAGES * len(TIMESTEPS)
    assert sorted({int(r["step"]) for r in rows}) == STEPS
    assert sorted({int(r["timestep"]) for r in rows}) == [0, 500, 999]

    # one (image, t) of step 2, recomputed from the rater checkpoint without the workflow
    row = next(r for r in rows if r["step"] == "2" and r["image"] == "3" and r["t"] == "0.5")
    rater, _ = load_rater(root / "rater-step2")
    digits = create("dataset", "digits", split="train", holdout_fraction=0.2, seed=0)
    x0 = digits.images[int(row["image_index"])].float()
    label = int(digits.labels[int(row["image_index"])])
    assert label == int(row["label"])
    noise = torch.randn((CANDIDATES, 1, 8, 8), generator=seeded_generator(0, 3, STREAM_ANALYZE_NOISE))
    with torch.no_grad():
        scores = rater(noise, torch.full((CANDIDATES,), 500), x0.expand(CANDIDATES, -1, -1, -1),
                       torch.full((CANDIDATES,), label)).double().numpy()
    norms = noise.flatten(1).norm(dim=1).double().numpy()
    assert float(row["spearman"]) == pytest.approx(stats.spearmanr(scores, norms).statistic, abs=1e-9)
    assert float(row["score_std"]) == pytest.approx(np.std(scores, ddof=1), rel=1e-5)

    # the summary pools all timesteps per stage
    summary = read_rows(root / "summary.csv")
    stage2 = next(r for r in summary if r["axis"] == "stage" and r["value"] == "2" and r["statistic"] == "score_std")
    mine = [float(r["score_std"]) for r in rows if r["step"] == "2"]
    assert int(stage2["count"]) == IMAGES * len(TIMESTEPS)
    assert float(stage2["median"]) == pytest.approx(float(np.median(mine)))
    by_t = [r for r in summary if r["axis"] == "timestep" and r["statistic"] == "spearman"]
    assert [float(r["value"]) for r in by_t] == TIMESTEPS
    assert all(int(r["count"]) + int(r["undefined"]) == len(STEPS) * IMAGES for r in by_t)


def test_step_zero_is_the_initial_weights(analyzed):
    from noisevalue.config import load_recipe
    from noisevalue.train.build import backbone_params, build_backbone

    init = analyzed / "analyze" / "init" / "checkpoints" / "step_0000000"
    model, ema = load_file(str(init / "model.safetensors")), load_file(str(init / "ema.safetensors"))
    recipe = load_recipe(None, TINY_ANALYZE)
    torch.manual_seed(recipe.seed)
    fresh = build_backbone(recipe, backbone_params(recipe, (1, 8, 8), 10)).state_dict()
    assert set(model) == set(fresh)
    assert all(torch.equal(model[k], fresh[k]) and torch.equal(ema[k], fresh[k]) for k in fresh)
    trained = load_file(str(analyzed / "pretrain" / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert any(not torch.equal(model[k], trained[k]) for k in model)


def test_second_call_reuses_everything(analyzed):
    root = analyzed / "analyze"
    watched = [root / "scores_stats.csv", root / "summary.csv", root / "init" / "DONE",
               *(root / f"rater-step{s}" / "DONE" for s in STEPS), *(root / f"stats-step{s}.npz" for s in STEPS)]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in watched}
    result = invoke("analyze", *TINY_ANALYZE, "analyze.steps=[0,2,4]", f"output_dir={analyzed}")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "starting" not in result.output and "scored step" not in result.output
    for p, (data, mtime) in before.items():
        assert p.read_bytes() == data, p
        if p.suffix != ".csv":  # tables are rewritten (same bytes); stages and caches untouched
            assert p.stat().st_mtime_ns == mtime, p


def test_explicit_checkpoint_is_labelled_by_its_step(analyzed, tmp_path):
    out = tmp_path / "explicit"
    result = invoke("analyze", *TINY_ANALYZE, f"output_dir={out}", "--checkpoint", analyzed / "pretrain")
    assert result.exit_code == 0, (result.output, result.exception)
    rows = read_rows(out / "analyze" / "scores_stats.csv")
    assert {r["step"] for r in rows} == {"4"} and len(rows) == IMAGES * len(TIMESTEPS)
    assert not (out / "pretrain").exists()  # no stage (i) needed


def test_a_missing_step_is_one_line_and_exit_code_2(analyzed):
    result = invoke("analyze", *TINY_ANALYZE, f"output_dir={analyzed}", "--step", "3")
    assert result.exit_code == 2, (result.output, result.exception)
    err = result.stderr.strip()
    assert err.count("\n") == 0, err
    assert "no stage-(i) checkpoint at step 3" in err and "0, 2, 4" in err and "train.keep_every" in err
    # before stage (i) has run: refused at once, from the checkpoints it would keep
    result = invoke("analyze", *TINY_ANALYZE, f"output_dir={analyzed.parent / 'fresh'}", "--step", "1")
    assert result.exit_code == 2 and "will keep steps 0, 2, 4" in result.stderr
    assert not (analyzed.parent / "fresh").exists()


def test_signal_compares_every_scorer_with_the_oracle(analyzed):
    """``analyze --signal`` on the shared stage-(i) run: the meta-trained and untrained
    raters and the two norm baselines, each group scored against the same oracle."""
    result = invoke("analyze", *TINY_ANALYZE, f"output_dir={analyzed}", "--signal", "meta.outer_steps=2",
                    "analyze.signal_groups=12", "analyze.signal_val_draws=2")
    assert result.exit_code == 0, (result.output, result.exception)
    root = analyzed / "analyze" / "signal"
    rows = read_rows(root / "signal.csv")
    by = {}
    for r in rows:
        by.setdefault(r["scorer"], {})[int(r["group"])] = r
    assert set(by) == {"rater (meta-trained)", "rater (untrained)", "max-norm", "min-norm"}
    assert all(len(v) == 12 for v in by.values())
    for g in range(12):
        hi, lo = by["max-norm"][g], by["min-norm"][g]
        assert float(hi["spearman"]) == pytest.approx(-float(lo["spearman"]))  # same oracle, reversed scores
        assert hi["t"] == lo["t"] == by["rater (untrained)"][g]["t"]
        for r in (hi, lo):
            assert float(r["captured"]) <= 1 + 1e-9 and r["top1"] in ("0.0", "1.0")
    md = (root / "signal.md").read_text()
    assert "| rater (meta-trained) |" in md and "Spearman with the oracle by timestep" in md
    assert (root / "signal.png").stat().st_size > 0
    assert (analyzed / "rater-untrained" / "DONE").is_file()
    result = invoke("analyze", *TINY_ANALYZE, f"output_dir={analyzed}", "--signal", "--step", "2")
    assert result.exit_code == 2 and "drop --checkpoint / --step" in result.stderr
