"""The inner loop of Algorithm 1 as the paper states it: the group-softmax-weighted loss, the
diffusion trainer's AdamW resumed from its checkpoint, and the oracle alignment score.
Everything derivative-sensitive runs in float64 on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from noisevalue import checkpoint as ckpt
from noisevalue.meta import Unrolled, make_problem, param_dict, unroll
from noisevalue.selectors.oracle import (
    OracleSelector,
    PreconditionedOracleSelector,
    alignment_scores,
)
from noisevalue.train.meta_training import checkpoint_adam_state, cosine
from tests.test_meta import CLASSES, SIZE, TinyNet, TinyRater, batches

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def test_weighted_inner_loss_equals_a_per_candidate_formula(diffusion):
    """L_in = mean over groups of sum_k w_k ||eps_k - eps_theta(x_t^k, t, y)||^2 with
    w = exp(s_k) / sum_j exp(s_j), written out one candidate at a time."""
    torch.manual_seed(0)
    net, rater = TinyNet().double(), TinyRater().double()
    inner, val = batches(0, 1, b=3, k=4)
    batch = inner[0]
    problem = make_problem(net, rater, diffusion, inner, val)
    got = problem.inner_loss(param_dict(net), param_dict(rater), batch)
    total = 0.0
    b, k = batch.noise.shape[:2]
    abar = diffusion.alphas_cumprod.double()
    for i in range(b):
        x0, y, t = batch.x0[i : i + 1], batch.y[i : i + 1], batch.t[i : i + 1]
        with torch.no_grad():
            scores = [float(rater(batch.noise[i, j][None], t, x0, y)) for j in range(k)]
        z = sum(math.exp(s) for s in scores)
        for j in range(k):
            eps = batch.noise[i, j][None]
            a = abar[t]
            x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * eps
            err = float(((eps - net(x_t, t, y)) ** 2).mean())
            total += math.exp(scores[j]) / z * err
    assert float(got) == pytest.approx(total / b, rel=1e-12)


def trained_adamw(net: nn.Module, steps: int, lr: float, betas, eps: float, wd: float) -> torch.optim.AdamW:
    """A few real AdamW steps on random data, so the moments and step count are non-trivial."""
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, betas=betas, eps=eps,
                            weight_decay=wd)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(4, 1, SIZE, SIZE, generator=g, dtype=F64)
        t = torch.randint(0, 1000, (4,), generator=g)
        y = torch.randint(0, CLASSES + 1, (4,), generator=g)
        opt.zero_grad()
        (net(x, t, y) - x).pow(2).mean().backward()
        opt.step()
    return opt


def test_adamw_checkpoint_inner_steps_equal_torch_adamw_resumed(diffusion, tmp_path):
    """S = 3 differentiable inner steps from the checkpoint's moments and step count equal
    torch.optim.AdamW resumed from the same saved state and stepped on the same weighted
    losses, to 1e-10 in float64; the state comes back through a real checkpoint folder."""
    torch.manual_seed(0)
    net, rater = TinyNet().double(), TinyRater().double()
    lr, betas, eps, wd = 3e-3, (0.9, 0.95), 1e-8, 0.05
    opt = trained_adamw(net, 7, lr, betas, eps, wd)
    tensors, meta = ckpt.optimizer_to_flat(opt.state_dict())
    path = ckpt.save_checkpoint(tmp_path, {"model": net.state_dict(), "optimizer": tensors},
                                ckpt.CheckpointMeta(step=7, optimizer=meta))
    theta = param_dict(net)
    state, step = checkpoint_adam_state(path, list(theta))
    assert step == 7 and set(state) == {"m", "v"}
    inner, val = batches(1, 3)
    problem = make_problem(net, rater, diffusion, inner, val, "adamw", lr,
                           {"betas": betas, "eps": eps, "weight_decay": wd}, inner_state=state, inner_step=step)
    eta = param_dict(rater)
    ours = unroll(problem, theta, eta).theta

    reference = TinyNet().double()
    reference.load_state_dict(net.state_dict())
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=lr, betas=betas,
                                eps=eps, weight_decay=wd)
    ref_opt.load_state_dict(ckpt.optimizer_from_flat(ckpt.load_tensors(path, "optimizer"), meta))
    ref_problem = make_problem(reference, rater, diffusion, inner, val)
    for batch in inner:
        ref_opt.zero_grad()
        ref_problem.inner_loss(dict(reference.named_parameters()), eta, batch).backward()
        ref_opt.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(ours[name], p.detach(), rtol=0, atol=1e-10)
    # a fresh AdamW (zero moments, count from 1) takes different steps
    fresh = make_problem(net, rater, diffusion, inner, val, "adamw", lr, {"betas": betas, "eps": eps, "weight_decay": wd})
    moved = unroll(fresh, theta, eta).theta
    assert max(float((moved[k] - ours[k]).abs().max()) for k in ours) > 1e-4


def test_meta_gradient_through_resumed_adamw_is_exact(diffusion, tmp_path):
    """Reverse and mixed mode agree through the resumed optimizer, and a central finite
    difference confirms the derivative (the starting moments are constants)."""
    torch.manual_seed(0)
    net, rater = TinyNet().double(), TinyRater().double()
    opt = trained_adamw(net, 4, 1e-2, (0.9, 0.999), 1e-8, 0.0)
    theta = param_dict(net)
    names = list(theta)
    state = {"m": {n: opt.state[p]["exp_avg"] for n, p in zip(names, opt.param_groups[0]["params"], strict=True)},
             "v": {n: opt.state[p]["exp_avg_sq"] for n, p in zip(names, opt.param_groups[0]["params"], strict=True)}}
    inner, val = batches(2, 2)
    problem = make_problem(net, rater, diffusion, inner, val, "adamw", 1e-2, {"eps_root": 1e-16},
                           inner_state=state, inner_step=4)
    eta = param_dict(rater)
    rev = Unrolled("reverse").meta_gradient(problem, theta, eta)
    mixed = Unrolled("mixed").meta_gradient(problem, theta, eta)
    cos, _, _ = cosine(rev.grad, mixed.grad)
    assert cos == pytest.approx(1.0, abs=1e-12)
    g = torch.Generator().manual_seed(3)
    d = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in eta.items()}
    h = 1e-6

    def value(e):
        return float(problem.outer_loss(unroll(problem, theta, e).theta, problem.val_batch))

    fd = (value({k: eta[k] + h * d[k] for k in eta}) - value({k: eta[k] - h * d[k] for k in eta})) / (2 * h)
    analytic = sum(float((rev.grad[k] * d[k]).sum()) for k in eta)
    assert analytic == pytest.approx(fd, rel=1e-5)
    assert rev.inner_state is not None and set(rev.inner_state) == {"m", "v"}


def test_inner_state_must_fit_theta(diffusion):
    torch.manual_seed(0)
    net, rater = TinyNet().double(), TinyRater().double()
    inner, val = batches(0, 1)
    theta = param_dict(net)
    bad = {"m": {k: torch.zeros_like(v) for k, v in theta.items()}}  # no "v"
    problem = make_problem(net, rater, diffusion, inner, val, "adamw", 1e-3, inner_state=bad)
    with pytest.raises(ValueError, match="needs"):
        unroll(problem, theta, param_dict(rater))


def test_checkpoint_without_optimizer_state_is_refused(tmp_path):
    from noisevalue.errors import CheckpointError

    net = TinyNet().double()
    path = ckpt.save_checkpoint(tmp_path, {"model": net.state_dict()}, ckpt.CheckpointMeta(step=3))
    with pytest.raises(CheckpointError, match="adamw_checkpoint needs the optimizer state"):
        checkpoint_adam_state(path, list(param_dict(net)))


def test_oracle_score_equals_explicit_per_candidate_gradient_dot_products(diffusion):
    """One jvp gives <grad L_val, grad l_k> for every candidate: compare with the gradient of
    each candidate's loss, computed one at a time, dotted with the validation gradient."""
    torch.manual_seed(0)
    net = TinyNet().double()
    inner, val = batches(4, 1, b=3, k=5)
    batch = inner[0]
    validation = (val.x0, val.y, val.t, val.noise)
    got = alignment_scores(net, diffusion, batch.x0, batch.y, batch.t, batch.noise, validation, chunk_size=4)

    params = [p for p in net.parameters() if p.requires_grad]
    val_loss = diffusion.per_sample_loss(net, val.x0, val.t, val.y, val.noise).mean()
    g_val = torch.autograd.grad(val_loss, params)
    b, k = batch.noise.shape[:2]
    for i in range(b):
        for j in range(k):
            loss = diffusion.per_sample_loss(net, batch.x0[i : i + 1], batch.t[i : i + 1], batch.y[i : i + 1],
                                             batch.noise[i, j][None]).sum()
            g = torch.autograd.grad(loss, params)
            expected = sum(float((a * c).sum()) for a, c in zip(g, g_val, strict=True))
            assert float(got[i, j]) == pytest.approx(expected, rel=1e-10, abs=1e-14)

    from noisevalue.interfaces import TrainingContext

    selector = OracleSelector(k=k, val_batch_size=3)
    selector.bind(TrainingContext(model=net, diffusion=diffusion, validation_batch=lambda n: validation))
    assert torch.equal(selector.select(batch.x0, batch.y, batch.t, batch.noise), got.argmax(dim=1))


def test_oracle_precond_scores_are_the_alignment_in_adams_metric(diffusion):
    """oracle_precond scores <P grad L_val, grad l_k>, P = 1 / (sqrt(v_hat) + eps) from the
    optimizer's state: the oracle itself under SGD, the oracle times one number when v is
    one constant, and per-sample gradients (torch.func) dotted by hand for a given v."""
    from torch.func import functional_call, grad, vmap

    from noisevalue.interfaces import TrainingContext

    torch.manual_seed(0)
    net = TinyNet().double()
    inner, val = batches(4, 1, b=3, k=5)
    batch = inner[0]
    validation = (val.x0, val.y, val.t, val.noise)
    oracle = alignment_scores(net, diffusion, batch.x0, batch.y, batch.t, batch.noise, validation)
    params = [p for p in net.parameters() if p.requires_grad]

    def scores(optimizer):
        selector = PreconditionedOracleSelector(k=5, val_batch_size=3)
        selector.bind(TrainingContext(model=net, diffusion=diffusion, validation_batch=lambda n: validation,
                                      optimizer=optimizer))
        return selector.scores(batch.x0, batch.y, batch.t, batch.noise)

    assert torch.equal(scores(torch.optim.SGD(params, lr=0.01)), oracle)
    beta2, eps, step, c = 0.99, 1e-8, 3, 0.04
    adam = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, beta2), eps=eps)
    for p in params:
        adam.state[p] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(p),
                         "exp_avg_sq": torch.full_like(p, c)}
    scale = 1 / (math.sqrt(c / (1 - beta2**step)) + eps)
    torch.testing.assert_close(scores(adam), oracle * scale, rtol=1e-12, atol=0)

    g = torch.Generator().manual_seed(3)
    for p in params:  # second moments spread over four decades: the ranking can change
        adam.state[p]["exp_avg_sq"] = 10 ** (-4 * torch.rand(p.shape, generator=g, dtype=p.dtype)) * 1e-2
    got = scores(adam)
    named = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}

    def loss(th, x0, y, t, noise):
        def eps_fn(x, tt, yy):
            return functional_call(net, th, (x, tt, yy))

        return diffusion.per_sample_loss(eps_fn, x0, t, y, noise).mean()

    b, k = batch.noise.shape[:2]
    one = lambda th, x0, y, t, noise: loss(th, x0[None], y[None], t[None], noise[None])  # noqa: E731
    per_sample = vmap(grad(one), in_dims=(None, 0, 0, 0, 0))(
        named, batch.x0.repeat_interleave(k, 0), batch.y.repeat_interleave(k, 0), batch.t.repeat_interleave(k, 0),
        batch.noise.flatten(0, 1))
    g_val = grad(loss)(named, *validation)
    expected = torch.zeros(b * k, dtype=F64)
    for n, p in net.named_parameters():
        v_hat = adam.state[p]["exp_avg_sq"] / (1 - beta2**step)
        precond = 1 / (v_hat.sqrt() + eps)
        expected += (per_sample[n] * (precond * g_val[n])).flatten(1).sum(1)
    torch.testing.assert_close(got, expected.view(b, k), rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert not torch.allclose(got / got.abs().max(), oracle / oracle.abs().max(), atol=1e-2)  # not the oracle's


def test_one_step_cosine_is_one_for_a_tiny_sgd_step(diffusion):
    """The probe's quantity: through one SGD step with a tiny learning rate, the unrolled
    meta-gradient is the Theorem 4.2 gradient-alignment one (cosine -> 1)."""
    from noisevalue.meta import OneStep

    torch.manual_seed(0)
    net, rater = TinyNet().double(), TinyRater().double()
    inner, val = batches(6, 1)
    problem = make_problem(net, rater, diffusion, inner, val, "sgd", 1e-6)
    theta, eta = param_dict(net), param_dict(rater)
    a = Unrolled("reverse").meta_gradient(problem, theta, eta).grad
    b = OneStep().meta_gradient(problem, theta, eta).grad
    cos, na, nb = cosine(a, b)
    assert cos == pytest.approx(1.0, abs=1e-5) and na == pytest.approx(nb, rel=1e-4)
    far = make_problem(net, rater, diffusion, batches(6, 3)[0], val, "adamw", 5e-2)
    cos_far, _, _ = cosine(Unrolled("reverse").meta_gradient(far, theta, eta).grad,
                           OneStep().meta_gradient(far, theta, eta).grad)
    assert cos_far < 0.999
