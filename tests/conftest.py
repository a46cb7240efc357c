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


class CodeRunsIfUnpickled:
    """Unpickling this creates a folder: a stand-in for any command a crafted file could run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


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


def tiny_vae_and_images(root):
    """A tiny random AutoencoderKL (factor 4, 4 latent channels) saved as a local copy at
    ``root/vae``, and 12 random 20x24 images in two classes at ``root/images``."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=32, layers_per_block=1, sample_size=16,
    )
    vae.save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / "images" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "images" / cls / f"{i}.png")
