"""A toy where the right answer is known in advance.

Backbone eps_theta(x_t) = theta * x_t with a scalar theta reset to 0 every outer step. At
theta = 0 the training gradient of candidate k is
    grad_theta l_k = -2 (sqrt(abar_t) <eps_k, x0> + sqrt(1 - abar_t) ||eps_k||^2) / d
and the validation gradient is a negative constant, so by Theorem 4.2 a candidate is the
more useful the larger  u_k = sqrt(abar_t) <eps_k, x0> + sqrt(1 - abar_t) ||eps_k||^2,
which depends on the noise, the image and the timestep. Meta-training the dual-stream
rater must make its scores rank candidates by u (it does not at initialisation).
"""

import pytest
import torch
from scipy.stats import spearmanr

from noisevalue.diffusion import Diffusion
from noisevalue.meta import GroupedBatch, OneStep, PlainBatch, Unrolled, make_problem, param_dict
from noisevalue.raters.dual_stream import dual_stream_tiny

DIFFUSION = Diffusion()


class ScalarDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y):
        return self.theta * x


def grouped(g, b=16, k=4):
    x0 = torch.randn(b, 1, 4, 4, generator=g)
    t = torch.randint(200, 800, (b,), generator=g)
    return GroupedBatch(x0, None, t, torch.randn(b, k, 1, 4, 4, generator=g))


def usefulness(batch):
    x0, _, t, noise = batch.flat()
    a = DIFFUSION.alphas_cumprod[t].float()
    u = a.sqrt() * (noise * x0).flatten(1).sum(1) + (1 - a).sqrt() * noise.flatten(1).pow(2).sum(1)
    return u.view(batch.noise.shape[:2])


def rank_agreement(rater) -> float:
    """Mean Spearman correlation, per group, between scores and the known usefulness."""
    batch = grouped(torch.Generator().manual_seed(7), b=64, k=8)
    x0, y, t, noise = batch.flat()
    with torch.no_grad():
        scores = rater(noise, t, x0, y).view(64, 8)
    u = usefulness(batch)
    return float(torch.tensor([spearmanr(scores[i].numpy(), u[i].numpy())[0] for i in range(64)]).mean())


@pytest.mark.parametrize("engine, steps", [(OneStep(), 60), (Unrolled(mode="reverse"), 30)])
def test_rater_learns_to_prefer_the_provably_useful_noises(engine, steps):
    torch.manual_seed(0)
    rater = dual_stream_tiny(input_size=4, in_channels=1, num_classes=0, hidden_size=32, depth=1, num_heads=2)
    before = rank_agreement(rater)
    backbone = ScalarDenoiser()
    theta = param_dict(backbone)
    opt = torch.optim.Adam(rater.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        val = PlainBatch(torch.randn(32, 1, 4, 4, generator=g), None,
                         torch.randint(200, 800, (32,), generator=g), torch.randn(32, 1, 4, 4, generator=g))
        problem = make_problem(backbone, rater, DIFFUSION, [grouped(g)], val, inner_optimizer="sgd", inner_lr=0.05)
        result = engine.meta_gradient(problem, theta, param_dict(rater))
        for name, p in rater.named_parameters():
            p.grad = result.grad[name]
        opt.step()
    after = rank_agreement(rater)
    assert abs(before) < 0.3, before
    assert after > 0.5, after
