"""EMA: closed-form averages, warm-up, and names free of wrapper prefixes."""

import pytest
import torch

from noisevalue.ema import EMA, unwrap


def test_constant_decay_matches_closed_form():
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, decay=0.9)
    for _ in range(5):
        with torch.no_grad():
            model.weight.fill_(1.0)
        ema.update(model)
    # shadow = 1 - 0.9^5 after five updates towards 1 from 0
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 3), 1 - 0.9**5))


def test_warmup_decay():
    ema = EMA(torch.nn.Linear(1, 1), decay=0.999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(90) == pytest.approx(91 / 100)
    assert ema.decay_at(10**6) == 0.999
    assert EMA(torch.nn.Linear(1, 1), decay=0.999).decay_at(0) == 0.999


def test_keys_have_no_wrapper_prefixes():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    compiled = torch.compile(model)
    assert unwrap(compiled) is model
    ema = EMA(compiled, decay=0.5)
    assert set(ema.shadow) == set(model.state_dict()) == {"0.weight", "0.bias"}
