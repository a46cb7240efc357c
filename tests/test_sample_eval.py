"""``noisevalue sample`` and ``noisevalue eval`` on a tiny trained digits run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from noisevalue.cli import app
from noisevalue.evaluators.fid import FIDEvaluator, feature_statistics, frechet_distance
from tests.conftest import TINY

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args):
    result = cli(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def fails_cleanly(args, expected):
    result = cli(*args)
    assert result.exit_code == 2, (result.output, result.exception)
    err = result.stderr.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("noisevalue: error: ") and expected in err, err
    return err


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The digit-feature weights and reference statistics of this module, not ~/.cache."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NOISEVALUE_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache) -> Path:
    """A tiny digits run (4 training steps, class-conditional DiT-Tiny/2 in pixel space)."""
    out = tmp_path_factory.mktemp("sample") / "run"
    ok("run", *TINY, f"output_dir={out}")
    return out


def npz_images(path: Path) -> np.ndarray:
    with np.load(path) as data:
        return data["arr_0"]


# -- Fréchet distance: closed forms ------------------------------------------------------
def test_frechet_distance_closed_forms() -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((400, 12)) @ rng.standard_normal((12, 12)) + 3.0
    mu, sigma = feature_statistics(features)
    assert np.trace(sigma) > 10
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # the same set shifted by a known vector: same covariance, so FD = ||shift||^2
    shift = rng.standard_normal(12)
    mu2, sigma2 = feature_statistics(features + shift)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-10, atol=1e-10)
    assert frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(float(shift @ shift), rel=1e-8)
    # diagonal covariances: sum((mu1-mu2)^2) + sum(s1 + s2 - 2 sqrt(s1 s2))
    m1, m2 = rng.standard_normal(20), rng.standard_normal(20)
    s1, s2 = rng.uniform(0.1, 4.0, 20), rng.uniform(0.1, 4.0, 20)
    closed = ((m1 - m2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert closed > 1
    assert frechet_distance(m1, np.diag(s1), m2, np.diag(s2)) == pytest.approx(closed, rel=1e-9)


# -- sample ------------------------------------------------------------------------------
def direct_samples(run: Path, start: int, stop: int, cfg: float, steps: int, eta: float,
                   seed: int, weights: str = "ema") -> np.ndarray:
    """Images start..stop-1 computed here from the checkpoint: per-image seeded noise,
    labels i % 10, guided DDIM with the per-image generators, as uint8 NHWC."""
    from safetensors.torch import load_file

    from noisevalue.backbones.dit import DiT_Tiny_2
    from noisevalue.diffusion import Diffusion, ddim_sample, guided_eps
    from noisevalue.sampling.sample import STREAM_SAMPLES
    from noisevalue.train.batches import seeded_generator

    step = run / "checkpoints" / "step_0000004"
    meta = json.loads((step / "meta.json").read_text())
    model = DiT_Tiny_2(**meta["backbone"]["params"])
    model.load_state_dict(load_file(str(step / f"{weights}.safetensors")))
    model.eval()
    gens = [seeded_generator(seed, i, STREAM_SAMPLES) for i in range(start, stop)]
    noise = torch.cat([torch.randn((1, 1, 8, 8), generator=g) for g in gens])
    y = torch.arange(start, stop) % 10
    x = ddim_sample(guided_eps(model, 10, y, cfg), Diffusion(**meta["diffusion"]), noise,
                    num_steps=steps, eta=eta, generator=gens)
    unit = ((x + 1) / 2).clamp(0, 1)
    return (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_sample_writes_adm_npz_equal_to_a_direct_computation(run, tmp_path) -> None:
    result = ok("sample", run, "--num", 12, "--batch-size", 5, "--steps", 3, "--eta", 0.5, "--cfg-scale", 2)
    out = run / "samples" / "step_0000004-n12-ddim3-cfg2-eta0.5-seed0"
    npz = out / "samples.npz"
    assert f"samples: {npz}" in result.output and f"grid: {out / 'grid.png'}" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "samples.npz", "settings.json"]
    with np.load(npz) as data:
        assert data.files == ["arr_0", "arr_1"]
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (12, 8, 8, 1)
    assert labels.tolist() == [i % 10 for i in range(12)]
    assert images.std() > 10  # not a constant image
    # the same numbers from the EMA weights, batch for batch (shards of 5: 0-4, 5-9, 10-11)
    direct = np.concatenate([direct_samples(run, a, b, 2.0, 3, 0.5, 0) for a, b in ((0, 5), (5, 10), (10, 12))])
    np.testing.assert_array_equal(images, direct)

    # a second call reuses the complete result; another batch size gives the same images
    # (per-image seeds: only float round-off may move a pixel by one level)
    mtime = npz.stat().st_mtime_ns
    again = ok("sample", run, "--num", 12, "--batch-size", 5, "--steps", 3, "--eta", 0.5, "--cfg-scale", 2)
    assert "complete already, reused" in again.output and npz.stat().st_mtime_ns == mtime
    other = tmp_path / "bs4"
    ok("sample", run, "--num", 12, "--batch-size", 4, "--steps", 3, "--eta", 0.5, "--cfg-scale", 2, "--out", other)
    diff = np.abs(npz_images(other / "samples.npz").astype(int) - images.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    # the raw weights and a fixed class give other images and labels
    raw = tmp_path / "raw"
    ok("sample", run, "--num", 4, "--steps", 3, "--eta", 0.5, "--cfg-scale", 2, "--no-ema", "--class", 7, "--out", raw)
    with np.load(raw / "samples.npz") as data:
        assert data["arr_1"].tolist() == [7] * 4
        assert not np.array_equal(data["arr_0"], images[:4])
    settings = json.loads((raw / "settings.json").read_text())
    assert settings["use_ema"] is False and settings["class_label"] == 7


def test_interrupted_sample_continues_from_its_shards(run, tmp_path, monkeypatch) -> None:
    from noisevalue.sampling import sample as sampling

    calls: list[int] = []
    original = sampling.Sampler.images

    def flaky(self, start, stop):
        calls.append(start)
        if calls == [0, 4]:
            raise RuntimeError("killed while sampling the second shard")
        return original(self, start, stop)

    monkeypatch.setattr(sampling.Sampler, "images", flaky)
    out = tmp_path / "resumed"
    args = ["sample", run, "--num", 9, "--batch-size", 4, "--steps", 2, "--out", out]
    assert cli(*args).exit_code != 0
    assert [p.name for p in (out / "shards").iterdir()] == ["000000000-000000004.npy"]
    assert not (out / "samples.npz").exists()
    calls.clear()
    ok(*args)
    assert calls == [4, 8]  # the shard on disk was not drawn again
    assert not (out / "shards").exists()
    monkeypatch.setattr(sampling.Sampler, "images", original)
    whole = tmp_path / "whole"
    ok("sample", run, "--num", 9, "--batch-size", 4, "--steps", 2, "--out", whole)
    np.testing.assert_array_equal(npz_images(out / "samples.npz"), npz_images(whole / "samples.npz"))


@pytest.mark.slow  # two gloo processes: ~20 s on 2 CPU cores
def test_two_processes_give_the_images_of_one(run, tmp_path) -> None:
    common = ["--num", 10, "--batch-size", 3, "--steps", 2, "--eta", 0.5]
    ok("sample", run, *common, "--out", tmp_path / "one")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "noisevalue.cli", "sample", str(run), *map(str, common),
         "--out", str(tmp_path / "two"), "--nproc-per-node", "2"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "with 2 process(es)" in proc.stdout
    one, two = npz_images(tmp_path / "one" / "samples.npz"), npz_images(tmp_path / "two" / "samples.npz")
    assert one.shape == (10, 8, 8, 1) and one.std() > 10
    np.testing.assert_array_equal(one, two)


def test_stage_folder_uses_the_nearest_recipe_and_its_stage_settings(run, tmp_path) -> None:
    from noisevalue.sampling.sample import resolve_run, sample_settings

    root = tmp_path / "proto"
    shutil.copytree(run / "checkpoints", root / "pretrain" / "checkpoints")
    shutil.copy(run / "recipe.yaml", root / "recipe.yaml")
    (root / "pretrain" / "stage.json").write_text(json.dumps({"sample.cfg_scale": 3.0, "sample.num_steps": 7}))
    ctx = resolve_run(root / "pretrain" / "checkpoints" / "step_0000002")
    assert ctx.step == 2 and ctx.run_dir == root / "pretrain"
    settings = sample_settings(ctx)
    assert (settings.cfg_scale, settings.num_steps, settings.eta) == (3.0, 7, 0.0)
    assert settings.tag() == "step_0000002-n2000-ddim7-cfg3-eta0-seed0"  # eval.num_samples
    (root / "recipe.yaml").unlink()
    fails_cleanly(["sample", root / "pretrain"], "pass --recipe FILE")


# -- eval --------------------------------------------------------------------------------
def test_eval_of_an_npz_equals_the_evaluator_and_caches_the_reference(run, cache, tmp_path) -> None:
    from noisevalue.evaluators.digit_features import digits_split

    out = tmp_path / "s"
    ok("sample", run, "--num", 30, "--steps", 2, "--out", out)
    npz = out / "samples.npz"
    stats = tmp_path / "stats"
    first = ok("eval", npz, "--reference", "digits", "--stats-cache", stats)
    assert "computed from 360 images" in first.output
    record = json.loads((out / "eval.json").read_text())
    assert record["metric"] == "fd_digits" and record["n"] == 30 and record["cache_hit"] is False
    assert record["reference"] == "digits" and record["reference_n"] == 360

    ev = FIDEvaluator(features="digits")  # the in-training evaluator, same images
    reference, _ = digits_split("test")
    ev.prepare([reference])
    generated = torch.from_numpy(npz_images(npz)).permute(0, 3, 1, 2)
    expected = ev.evaluate([generated])["fd_digits"]
    assert expected > 1
    assert record["value"] == pytest.approx(expected, rel=1e-9)
    assert f"fd_digits {expected:.6g}" in first.output

    cached = sorted(stats.glob("*.npz"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    second = ok("eval", npz, "--reference", "digits", "--stats-cache", stats)
    assert f"cache hit {cached[0]}" in second.output
    assert sorted(stats.glob("*.npz")) == cached and cached[0].stat().st_mtime_ns == mtime
    again = json.loads((out / "eval.json").read_text())
    assert again["cache_hit"] is True and again["value"] == pytest.approx(record["value"], rel=1e-12)

    # the cached statistics as an ADM-style stats file, and a reference batch (arr_0)
    with np.load(cached[0]) as data:
        np.savez(tmp_path / "ref_stats.npz", mu=data["mu"], sigma=data["sigma"])
    by_stats = ok("eval", npz, "--reference", tmp_path / "ref_stats.npz", "--stats-cache", stats)
    assert json.loads((out / "eval.json").read_text())["value"] == pytest.approx(expected, rel=1e-9)
    assert "reference statistics: " in by_stats.output
    batch = (reference * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "ref_batch.npz", arr_0=batch)
    ok("eval", npz, "--reference", tmp_path / "ref_batch.npz", "--stats-cache", stats, "--num", 20)
    ev.prepare([torch.from_numpy(batch).permute(0, 3, 1, 2)])
    value = json.loads((out / "eval.json").read_text())["value"]
    assert value == pytest.approx(ev.evaluate([generated[:20]])["fd_digits"], rel=1e-9)
    assert len(json.loads((out / "eval.json").read_text())["results"]) == 3


def test_eval_of_a_run_samples_with_the_recipe_settings(run, tmp_path) -> None:
    result = ok("eval", run, "--num", 10, "--stats-cache", tmp_path)
    npz = run / "samples" / "step_0000004-n10-ddim2-cfg1.5-eta0-seed0" / "samples.npz"
    assert npz.is_file() and "data.eval_dataset (digits)" in result.output
    record = json.loads((npz.parent / "eval.json").read_text())
    assert record["metric"] == "fd_digits" and record["n"] == 10 and record["value"] > 0
    again = ok("eval", run, "--num", 10, "--stats-cache", tmp_path)
    assert "complete already, reused" in again.output and "cache hit" in again.output


def test_eval_of_a_run_equals_its_training_evaluation(tmp_path, cache) -> None:
    """The same images (image i from the generator (seed, i)), the same reference (the run's,
    its cached statistics): `noisevalue eval RUN` gives the fd_digits of metrics.json."""
    out = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith("eval.evaluators")]
    ok("run", *overrides, "eval.num_samples=30", "sample.batch_size=7", "eval.baselines=false", f"output_dir={out}")
    trained = json.loads((out / "metrics.json").read_text())["metrics"]["fd_digits"]
    ok("eval", out, "--batch-size", 11)  # other batches: an image does not depend on its batch
    record = json.loads(next((out / "samples").glob("*/eval.json")).read_text())
    # equal but for float32 round-off of other batch compositions (measured: 1.4e-9)
    assert record["n"] == 30 and record["value"] == pytest.approx(trained, rel=1e-6, abs=0)


# -- bad input ---------------------------------------------------------------------------
def test_bad_input_is_one_line_and_exit_code_2(run, tmp_path) -> None:
    fails_cleanly(["sample", tmp_path / "nowhere"], "nowhere' not found")
    fails_cleanly(["sample", run, "--class", 10, "--num", 2], "--class 10: expected a class in 0..9")
    fails_cleanly(["sample", run, "--num", 0], "--num: expected a positive number")
    fails_cleanly(["eval", tmp_path / "missing.npz", "--reference", "digits"], "missing.npz' not found")
    good = np.zeros((4, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "good.npz", arr_0=good)
    np.savez(tmp_path / "noarr.npz", images=good)
    fails_cleanly(["eval", tmp_path / "noarr.npz", "--reference", "digits"], "has no 'arr_0' (it holds images)")
    np.savez(tmp_path / "float.npz", arr_0=good.astype(np.float32))
    fails_cleanly(["eval", tmp_path / "float.npz", "--reference", "digits"], "'arr_0' is float32 of shape (4, 8, 8, 1)")
    np.savez(tmp_path / "nhw.npz", arr_0=good[..., 0])
    fails_cleanly(["eval", tmp_path / "nhw.npz", "--reference", "digits"], "expected uint8 images [N, H, W, C]")
    (tmp_path / "text.npz").write_text("not an archive")
    fails_cleanly(["eval", tmp_path / "text.npz", "--reference", "digits"], "is not a readable .npz")
    fails_cleanly(["eval", tmp_path / "good.npz"], "--reference is required")
    fails_cleanly(["eval", tmp_path / "good.npz", "--reference", tmp_path / "none"], "reference '")
    np.savez(tmp_path / "stats16.npz", mu=np.zeros(16), sigma=np.eye(16))
    fails_cleanly(["eval", tmp_path / "good.npz", "--reference", tmp_path / "stats16.npz"],
                  "stats16.npz' has mu (16,) / sigma (16, 16), but the digits features have dimension 64")
    fails_cleanly(["eval", tmp_path / "good.npz", "--reference", "digits", "--metric", "fid"],
                  "for `noisevalue eval`: --weights FILE")
    fails_cleanly(["eval", tmp_path / "good.npz", "--reference", "digits", "--metric", "is"], "--metric is: expected one of")


# -- eval with any registered evaluator ---------------------------------------------------
@pytest.fixture
def mean_gap():
    """A third-party evaluator registered in-process: |mean(generated) - mean(reference)| x
    scale; it keeps no reference statistics."""
    from noisevalue import registry
    from noisevalue.interfaces import Evaluator

    @registry.register("evaluator", "mean-gap")
    class MeanGap(Evaluator):
        def __init__(self, scale: float = 1.0) -> None:
            if scale <= 0:
                raise ValueError(f"scale must be positive, got {scale}")
            self.scale = scale

        def prepare(self, reference):
            self.ref = torch.cat([b.flatten() for b in reference]).double().mean()

        def evaluate(self, generated):
            gen = torch.cat([b.flatten() for b in generated]).double().mean()
            return {"mean_gap": float((gen - self.ref).abs() * self.scale)}

    yield
    registry.reset()


def test_eval_uses_a_plugin_evaluator_from_the_registry(run, cache, tmp_path, mean_gap) -> None:
    from noisevalue.evaluators.digit_features import digits_split

    out = tmp_path / "s"
    ok("sample", run, "--num", 12, "--steps", 2, "--out", out)
    npz = out / "samples.npz"
    result = ok("eval", npz, "--reference", "digits", "--evaluator", "mean-gap", "--param", "scale=2.5")
    record = json.loads((out / "eval.json").read_text())
    reference, _ = digits_split("test")
    expected = abs(npz_images(npz).astype(np.float64).mean() / 255 - reference.double().mean().item()) * 2.5
    assert record["metric"] == "mean_gap" and record["value"] == pytest.approx(expected, rel=1e-9)
    assert record["settings"] == {"evaluator": "mean-gap", "scale": 2.5}
    assert record["stats"] is None and record["reference_n"] == 360  # nothing cached
    assert "mean_gap" in result.output
    fails_cleanly(["eval", npz, "--reference", "digits", "--evaluator", "mean-gap", "--param", "scale=-1"],
                  "--evaluator (mean-gap): scale must be positive, got -1")
    fails_cleanly(["eval", npz, "--reference", "digits", "--evaluator", "mean-gap", "--param", "scale"],
                  "--param 'scale': expected KEY=VALUE")
    fails_cleanly(["eval", npz, "--reference", "digits", "--evaluator", "mean-gap", "--weights", npz],
                  "give evaluator 'mean-gap' its settings with --param KEY=VALUE")
    fails_cleanly(["eval", npz, "--reference", "digits", "--evaluator", "no-such"], "no-such")
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(2), sigma=np.eye(2))
    fails_cleanly(["eval", npz, "--reference", stats, "--evaluator", "mean-gap"], "keeps none; give reference images")


def test_the_sample_grid_has_one_row_per_class_as_in_training(tmp_path, monkeypatch):
    import numpy as np

    from noisevalue.sampling import sample as sp
    from noisevalue.train import evaluate as ev

    k, num = 10, 45  # sample i has class i % k: 4 full columns of each class
    shard = tmp_path / "shard.npy"
    np.save(shard, np.stack([np.full((8, 8, 1), i % k, dtype=np.uint8) for i in range(num)]))
    seen = {}
    monkeypatch.setattr(ev, "save_png_atomic", lambda images, path, nrow: seen.update(images=images, nrow=nrow))
    settings = type("S", (), {"num_classes": k, "class_label": None, "num": num})()
    sp._write_grid(tmp_path / "grid.png", [shard], settings)
    assert seen["nrow"] == 4  # columns per row
    classes = (seen["images"][:, 0, 0, 0] * 255).round().long().view(k, 4)
    assert torch.equal(classes, torch.arange(k).view(k, 1).expand(k, 4))  # row c: class c only
