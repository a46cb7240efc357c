"""``noisevalue transfer`` (paper Table 4, appendix B.4): the loss-matching rule on synthetic
curves with known answers, and the command end to end at a tiny size."""

import csv
import json
import math
import random

import pytest
from typer.testing import CliRunner

from noisevalue.cli import app
from noisevalue.experiments.matching import (
    level_at,
    matched_index,
    matched_step,
    nearest_checkpoint,
    smooth,
)

runner = CliRunner()


# ---------------------------------------------------------------------------- the rule
def loop_smooth(values, window):
    """The centred rolling mean written out: pandas' ``rolling(window, center=True,
    min_periods=1).mean()`` covers ``i - window // 2`` ... ``i + (window - 1) // 2``."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window // 2): i + (window - 1) // 2 + 1]
        out.append(sum(part) / len(part))
    return out


def brute_force_match(steps, losses, level, window, stability):
    """Eq. (10) read literally: the least logged t with every smoothed point of [t, t+W] at
    or below the level, the window inside the log."""
    sm = loop_smooth(losses, window)
    for i in range(len(steps)):
        if i + stability < len(steps) and all(v <= level for v in sm[i: i + stability + 1]):
            return steps[i]
    return None


def test_smooth_is_a_centred_rolling_mean_with_cut_off_ends():
    rng = random.Random(0)
    for n in (1, 2, 5, 13):
        values = [rng.uniform(-1, 1) for _ in range(n)]
        for window in (1, 2, 3, 4, 7, 20):
            assert smooth(values, window) == pytest.approx(loop_smooth(values, window), abs=1e-12)
    assert smooth([0.0, 1.0, 2.0, 3.0], 2) == [0.0, 0.5, 1.5, 2.5]  # even: one point further back
    assert smooth([0.0, 1.0, 2.0, 3.0], 3) == [0.5, 1.0, 2.0, 2.5]
    assert smooth([], 5) == []


def test_smooth_agrees_with_pandas():
    pd = pytest.importorskip("pandas")
    values = [math.sin(i) + 0.1 * i for i in range(30)]
    for window in (1, 2, 5, 6, 31):
        expected = pd.Series(values).rolling(window, center=True, min_periods=1).mean().tolist()
        assert smooth(values, window) == pytest.approx(expected, abs=1e-12)


def test_smoothing_window_one_is_the_identity():
    values = [3.0, -1.0, 2.5, 0.0, 7.0]
    assert smooth(values, 1) == values


def exp_curve(n, every, a=0.1, b=1.0, tau=2000.0):
    steps = [every * (i + 1) for i in range(n)]
    return steps, [a + b * math.exp(-s / tau) for s in steps]


def test_monotone_exponential_curve_matches_in_closed_form():
    a, b, tau, every, n = 0.1, 1.0, 2000.0, 10, 1000
    steps, losses = exp_curve(n, every, a, b, tau)
    level = 0.3
    # no smoothing: the first logged step with a + b exp(-t/tau) <= level
    t_c = tau * math.log(b / (level - a))
    expected = every * math.ceil(t_c / every)
    for stability in (0, 5, 50):  # monotone: once below, it stays below
        assert matched_step(steps, losses, level, 1, stability) == expected
    # a centred mean of w equally spaced points of an exponential is the exponential times
    # c = mean of exp(-k * every / tau) over k = -w//2 .. (w-1)//2, away from the ends
    w = 25
    c = sum(math.exp(-k * every / tau) for k in range(-(w // 2), (w - 1) // 2 + 1)) / w
    t_s = tau * math.log(b * c / (level - a))
    assert t_s > t_c  # smoothing a convex decreasing curve lifts it: the match comes later
    assert matched_step(steps, losses, level, w, 25) == every * math.ceil(t_s / every)


def test_noisy_curve_matches_the_literal_rule_near_the_clean_answer():
    rng = random.Random(1)
    steps, clean = exp_curve(2000, 10)
    noisy = [v + rng.gauss(0, 0.05) for v in clean]
    level = 0.3
    t_clean = matched_step(steps, clean, level, 1, 0)
    for window, stability in ((1, 0), (1, 10), (50, 0), (50, 100)):
        got = matched_step(steps, noisy, level, window, stability)
        assert got == brute_force_match(steps, noisy, level, window, stability)
    # raw noise crosses early; smoothing and the stability window bring it back near the truth
    assert matched_step(steps, noisy, level, 1, 0) < t_clean - 200
    assert abs(matched_step(steps, noisy, level, 50, 100) - t_clean) <= 150


def test_a_single_step_dip_cannot_trigger_a_match():
    losses = [2.0] * 100
    losses[5] = -1e6  # one absurd logged point, far below the level
    for i in range(60, 100):
        losses[i] = 0.5  # the real crossing
    steps = list(range(100, 10100, 100))
    window = 5
    # the dip drags down exactly `window` smoothed points, so W >= window cannot be fooled
    assert matched_step(steps, losses, 1.0, window, window) == brute_force_match(steps, losses, 1.0, window, window)
    assert matched_step(steps, losses, 1.0, window, window) > steps[50]
    assert matched_step(steps, losses, 1.0, window, window - 1) == steps[3]  # a shorter W can be
    assert matched_step(steps, losses, 1.0, 1, 1) > steps[50]  # unsmoothed, any W >= 1 suffices


def test_a_curve_that_never_reaches_the_level_has_no_match():
    steps, losses = exp_curve(100, 10)
    assert matched_step(steps, losses, 0.05, 1, 0) is None  # the asymptote is 0.1
    assert matched_step([], [], 1.0, 3, 0) is None


def test_the_stability_window_must_fit_inside_the_log():
    losses = [1.0] * 10 + [0.0] * 3  # below the level for the last 3 points only
    steps = list(range(1, 14))
    assert matched_step(steps, losses, 0.5, 1, 2) == 11
    assert matched_step(steps, losses, 0.5, 1, 3) is None  # it cannot be confirmed for 3 more


def test_stability_window_zero_is_the_first_point_at_or_below_the_level():
    losses = [3.0, 2.0, 1.0, 2.0, 0.5]
    assert matched_index(losses, 1.0, 0) == 2  # equality counts
    assert matched_index(losses, 1.0, 1) is None
    assert matched_step([10, 20, 30, 40, 50], losses, 2.0, 1, 0) == 20


def test_nearest_checkpoint_and_source_level():
    kept = [100_000, 200_000, 300_000, 400_000]
    assert nearest_checkpoint(kept, 211_000) == 200_000  # the paper's DiT-B/2
    assert nearest_checkpoint(kept, 119_000) == 100_000  # the paper's DiT-L/2
    assert nearest_checkpoint(kept, 150_000) == 100_000  # a tie goes to the earlier one
    assert nearest_checkpoint(kept, 10) == 100_000
    assert nearest_checkpoint(kept, 900_000) == 400_000
    with pytest.raises(ValueError):
        nearest_checkpoint([], 5)
    assert level_at([10, 20, 30], [3.0, 2.0, 1.0], 24, 1) == (20, 2.0)
    assert level_at([10, 20, 30], [3.0, 2.0, 1.0], 30, 2) == (30, 1.5)


# ---------------------------------------------------------------------------- the command
TINY = [
    "train.steps=8", "train.log_every=1", "train.ckpt_every=2", "train.keep_every=2",
    "train.global_batch_size=8", "train.threads=1", "sample.num_steps=2", "sample.per_class=1",
    "eval.evaluators=[{name: fid, params: {features: digits}}]", "eval.num_samples=20", "eval.baselines=false",
    "eval.loss_draws=2", "eval.loss_images=24",
    "rater={name: dual_stream_tiny, params: {hidden_size: 32, depth: 1, num_heads: 2}}",
    "meta.outer_steps=2", "meta.inner_steps=1", "meta.groups=2", "meta.group_size=2", "meta.val_batch_size=4",
    "transfer.targets=[{name: DiT-Tiny-B/2}]", "transfer.pretrain_steps=16",
    "transfer.smoothing_window=2", "transfer.stability_window=1",
    "select.steps=2", "select.eval_every=2",
]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def read_csv(path, metric=None):
    """CSV lines; with ``metric``, only that metric's, its value under the metric's name."""
    rows = list(csv.DictReader(path.open()))
    if metric is None:
        return rows
    return [{**r, metric: r["value"]} for r in rows if r["metric"] == metric]


@pytest.fixture(scope="module")
def transferred(tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer") / "run"
    result = invoke("transfer", *TINY, f"output_dir={out}")
    assert result.exit_code == 0, (result.output, result.exception)
    return out, result


def test_transfer_end_to_end(transferred):
    from noisevalue.train.run_log import read_scalar

    out, result = transferred
    root = out / "transfer"
    for name in ("transfer.md", "transfer.csv", "transfer.png", "transfer_curves.png", "matching.md", "matching.csv",
                 "loss_curves.png"):
        assert (root / name).stat().st_size > 0, name
        assert str(root / name) in result.output
    # the matching, recomputed from the two logged curves
    (m,) = read_csv(root / "matching.csv")
    assert m["backbone"] == "DiT-Tiny-B/2" and m["source_backbone"] == "DiT-Tiny/2"
    assert int(m["source_step"]) == 8  # the rater was trained on stage (i)'s last checkpoint
    src_steps, src_loss = read_scalar(out / "pretrain", "train/loss")
    tgt_steps, tgt_loss = read_scalar(root / "DiT-Tiny-B_2" / "pretrain", "train/loss")
    level = smooth(src_loss, 2)[src_steps.index(8)]
    assert float(m["source_smoothed_loss"]) == pytest.approx(level)
    matched = matched_step(tgt_steps, tgt_loss, level, 2, 1)
    assert matched is not None and int(m["matched_step"]) == matched
    chosen = nearest_checkpoint(list(range(2, 17, 2)), matched)  # ckpt_every = keep_every = 2
    assert int(m["checkpoint_step"]) == chosen
    # both continuations start from that checkpoint and run select.steps more
    for kind in ("vanilla", "rater"):
        run = root / "DiT-Tiny-B_2" / kind
        settings = json.loads((run / "stage.json").read_text())
        assert settings["train.init_from"].endswith(f"step_{chosen:07d}")
        assert settings["train.steps"] == chosen + 2
        assert settings["model.name"] == "DiT-Tiny-B/2"
        assert settings["model.params"]["learn_sigma"] is False  # inherited from the recipe's model
        history = json.loads((run / "metrics.json").read_text())["history"]
        assert [h["step"] for h in history] == [chosen + 2]
    rater_params = json.loads((root / "DiT-Tiny-B_2" / "rater" / "stage.json").read_text())["train.selector.params"]
    assert rater_params["k"] == 2 and rater_params["checkpoint"].endswith("step_0000002")
    rows = read_csv(root / "transfer.csv", "fd_digits")
    base = f"DiT-Tiny-B/2 (from step {chosen})"
    assert {r["run"] for r in rows} == {base, f"{base} + rater (k=2)"}
    assert {int(r["step"]) for r in rows} == {chosen, chosen + 2}
    # the start column: the target pretraining's own evaluation at the chosen checkpoint
    # (evaluated every train.keep_every steps, since the recipe sets no eval.every)
    evaluated = json.loads((root / "DiT-Tiny-B_2" / "pretrain" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in evaluated] == list(range(2, 17, 2))
    start = next(h["fd_digits"] for h in evaluated if h["step"] == chosen)
    assert {float(r["fd_digits"]) for r in rows if int(r["step"]) == chosen} == {start}
    md = (root / "transfer.md").read_text()
    assert f"| {base} | {start:.3f} |" in md and f"| {base} + rater (k=2) | {start:.3f} |" in md
    assert f"| start (step {chosen}) | +2 |" in md


def test_second_invocation_reuses_every_stage(transferred):
    out, _ = transferred
    before = (out / "transfer" / "transfer.csv").read_text()
    again = invoke("transfer", *TINY, f"output_dir={out}")
    assert again.exit_code == 0, again.output
    # stage (i), stage (ii), the target's pretraining, two continuations
    assert again.output.count("reused") == 5
    assert "starting" not in again.output
    assert (out / "transfer" / "transfer.csv").read_text() == before


def test_more_seeds_add_continuations_only(transferred):
    out, _ = transferred
    result = invoke("transfer", *TINY, f"output_dir={out}", "select.seeds=[0,1]")
    assert result.exit_code == 0, result.output
    # seed 1: its start scored with its own sample noise (a 0-step continuation), two continuations
    assert result.output.count("reused") == 5 and result.output.count("starting") == 3
    target = out / "transfer" / "DiT-Tiny-B_2"
    assert (target / "vanilla-seed1" / "DONE").is_file() and (target / "rater-seed1" / "DONE").is_file()
    rows = read_csv(out / "transfer" / "transfer.csv")
    assert {r["seed"] for r in rows} == {"0", "1", "mean"}
    (m,) = read_csv(out / "transfer" / "matching.csv")
    chosen = int(m["checkpoint_step"])
    assert json.loads((target / "start-seed1" / "stage.json").read_text())["seed"] == 1
    seed1 = json.loads((target / "start-seed1" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in seed1] == [chosen]
    own = next(h for h in json.loads((target / "pretrain" / "metrics.json").read_text())["history"]
               if h["step"] == chosen)

    def start(metric, seed):
        return next(float(r["value"]) for r in rows
                    if (r["metric"], r["seed"], int(r["step"])) == (metric, str(seed), chosen))

    assert start("fd_digits", 0) == own["fd_digits"] and start("fd_digits", 1) == seed1[0]["fd_digits"]
    assert start("fd_digits", 0) != start("fd_digits", 1)  # other sample noise
    assert start("heldout_loss", 1) == start("heldout_loss", 0)  # no seed in it
    assert "Seeds [0, 1]" in (out / "transfer" / "transfer.md").read_text()


def test_a_target_that_never_matches_then_pretrains_longer(transferred):
    out, _ = transferred
    short = invoke("transfer", *TINY, f"output_dir={out}", "transfer.pretrain_steps=2", "--to", "DiT-Tiny/2")
    assert short.exit_code == 2, short.output
    assert "transfer.pretrain_steps (now 2)" in short.stderr and short.stderr.strip().count("\n") == 0
    assert not (out / "transfer" / "DiT-Tiny_2" / "vanilla").exists()  # nothing continued
    longer = invoke("transfer", *TINY, f"output_dir={out}", "transfer.pretrain_steps=12", "--to", "DiT-Tiny/2")
    assert longer.exit_code == 0, longer.output
    assert "extending from 2 to 12 steps" in longer.output
    # the source's own backbone, seed and data: its curve is the source's, so it matches at
    # the source's step (or, by float noise, one later: the tie between 8 and 10 goes to 8)
    (m,) = read_csv(out / "transfer" / "matching.csv")
    assert m["backbone"] == "DiT-Tiny/2" and int(m["matched_step"]) in (8, 9) and int(m["checkpoint_step"]) == 8
    # resumed, not restarted: the same backbone, seed and data as stage (i), so the same losses
    from noisevalue.train.run_log import read_scalar

    assert read_scalar(out / "transfer" / "DiT-Tiny_2" / "pretrain", "train/loss")[1][:8] == pytest.approx(
        read_scalar(out / "pretrain", "train/loss")[1], rel=1e-6
    )


def fake_rater(path, size, channels, classes, pretrained):
    from noisevalue import checkpoint
    from noisevalue.raters.dual_stream import dual_stream_tiny

    params = {"input_size": size, "in_channels": channels, "num_classes": classes,
              "hidden_size": 32, "depth": 1, "num_heads": 2}
    rater = dual_stream_tiny(**params)
    meta = checkpoint.CheckpointMeta(step=3, rater={"name": "dual_stream_tiny", "params": params},
                                     latent_shape=(channels, size, size), num_classes=classes,
                                     pretrained=str(pretrained))
    return checkpoint.save_checkpoint(path, {"rater": rater.state_dict()}, meta)


def test_a_rater_for_other_latents_is_refused_before_any_training(tmp_path):
    rater = fake_rater(tmp_path / "r", 4, 2, 3, tmp_path / "src" / "checkpoints" / "step_0000008")
    out = tmp_path / "run"
    result = invoke("transfer", *TINY, f"output_dir={out}", "--rater", tmp_path / "r")
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.count("\n") == 0
    assert str(rater) in err and "(2, 4, 4)" in err and "3 classes" in err
    assert "(1, 8, 8)" in err and "10 classes" in err
    assert not (out / "pretrain").exists() and not (out / "transfer" / "DiT-Tiny-B_2").exists()


def test_a_rater_whose_source_has_no_loss_log(tmp_path):
    fake_rater(tmp_path / "r", 8, 1, 10, tmp_path / "elsewhere" / "checkpoints" / "step_0000100")
    result = invoke("transfer", *TINY, f"output_dir={tmp_path / 'run'}", "--rater", tmp_path / "r")
    assert result.exit_code == 2, result.output
    assert "scalars.jsonl" in result.stderr and str(tmp_path / "elsewhere") in result.stderr
    assert not (tmp_path / "run" / "transfer" / "DiT-Tiny-B_2").exists()
