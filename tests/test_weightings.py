"""Loss weightings: closed forms, the training loss they give, and one-line errors."""

import math

import pytest
import torch

from noisevalue import registry
from noisevalue.diffusion import Diffusion
from noisevalue.errors import ConfigError


def test_snr_is_the_schedule_closed_form():
    d = Diffusion()
    t = torch.tensor([0, 10, 500, 999])
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)[t]
    # diffusers builds abar in float32: 1 - abar (1e-4 at t = 0) carries its rounding
    torch.testing.assert_close(d.snr(t), abar / (1 - abar), rtol=1e-3, atol=0)
    assert d.snr(t)[0] == pytest.approx(1e4, rel=1e-3) and d.snr(t)[3] == pytest.approx(4.04e-5, rel=1e-2)


def test_min_snr_and_p2_equal_their_closed_forms():
    snr = torch.tensor([0.0, 0.01, 1.0, 4.999, 5.0, 7.5, 100.0, 1e4], dtype=torch.float64)
    min_snr = registry.create("loss_weighting", "min_snr", gamma=5.0).weight(snr)
    expected = [1.0 if s == 0 else min(s, 5.0) / s for s in snr.tolist()]  # SNR = 0 guarded: weight 1
    assert min_snr.tolist() == pytest.approx(expected, rel=1e-15)
    for k, gamma in ((1.0, 0.5), (1.0, 1.0), (2.0, 0.25)):
        p2 = registry.create("loss_weighting", "p2", k=k, gamma=gamma).weight(snr)
        assert p2.tolist() == pytest.approx([(k + s) ** -gamma for s in snr.tolist()], rel=1e-15)
    assert torch.equal(registry.create("loss_weighting", "uniform").weight(snr), torch.ones_like(snr))


def test_weighted_training_loss_is_the_weighted_mean(tiny_overrides, tmp_path):
    """One training step with min_snr: the logged loss is mean(w(SNR_t) * eps-MSE) of the
    step's own draws, recomputed here from the same seeded draws and initial weights."""
    from noisevalue.config import load_recipe
    from noisevalue.distributed import init
    from noisevalue.train.diffusion_training import DiffusionTraining

    recipe = load_recipe(None, [*tiny_overrides, "train.steps=1", "train.loss_weighting.name=min_snr",
                                "train.loss_weighting.params.gamma=0.5"])
    trainer = DiffusionTraining(recipe, tmp_path / "run", init("cpu"))
    trainer.setup()
    model = __import__("copy").deepcopy(trainer.model)
    logged = trainer.train_step(0)
    # the same draws, unweighted and weighted by hand
    from noisevalue.train.batches import draw_step

    r = recipe
    idx = trainer.order.batch(0, r.train.global_batch_size)
    draws = draw_step(r.seed, 0, r.train.global_batch_size, trainer.latent_shape, 1000, trainer.drop_prob,
                      r.data.random_flip, k=1)
    x0, y = trainer.data.fetch(idx, draws.flip)
    y_in = torch.where(draws.drop, torch.full_like(y, trainer.num_classes), y)
    with torch.no_grad():
        losses = trainer.diffusion.per_sample_loss(model, x0, draws.t, y_in, draws.noise[:, 0])
    snr = trainer.diffusion.snr(draws.t)
    w = torch.where(snr > 0.5, 0.5 / snr, torch.ones_like(snr))
    assert logged == pytest.approx(float((losses * w).mean()), rel=1e-6)
    assert not math.isclose(logged, float(losses.mean()), rel_tol=1e-3)  # the weighting did something
    trainer.cleanup()


@pytest.mark.parametrize("name, params, message", [
    ("min_snr", {"gamma": 0}, "loss weighting 'min_snr': gamma must be a finite number > 0, got 0"),
    ("p2", {"gamma": -1}, "loss weighting 'p2': gamma must be a finite number > 0, got -1"),
    ("p2", {"k": "one"}, "loss weighting 'p2': k must be a finite number > 0, got 'one'"),
])
def test_bad_values_are_one_line_errors(name, params, message):
    from noisevalue.config import Component

    with pytest.raises(ConfigError, match=message):
        registry.build("loss_weighting", Component(name=name, params=params), where="train.loss_weighting")
