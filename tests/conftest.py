import os

import pytest

# Tests must never reach for the network (weights, datasets).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = [
    "workflow=pretrain",
    "train.steps=4",
    "train.global_batch_size=8",
    "train.ckpt_every=2",
    "train.log_every=1",
    "train.threads=1",
    "eval.evaluators=[]",
    "eval.loss_draws=2",
    "eval.loss_images=24",
    "sample.num_steps=2",
    "sample.per_class=1",
]


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that shrink the digits default to a few seconds, writing under tmp_path."""
    return [*TINY, f"output_dir={tmp_path / 'run'}"]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for tiny models: more only add contention (and erratic timings)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def diffusion():
    from noisevalue.diffusion import Diffusion

    return Diffusion()
