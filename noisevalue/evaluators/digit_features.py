"""A download-free feature space for handwritten digits (the ``digits`` and ``digits32``
evaluator features).

FID needs a feature extractor whose activations encode what an image *shows*. For the
scikit-learn ``load_digits`` images (8x8, 17 grey levels) Inception is the wrong tool:
each image would be blown up ~37x to 299x299 and fed to a network trained on photographs,
and its weights cannot be downloaded offline anyway. Instead we train a small classifier on
the digits themselves and use its penultimate activations, exactly the role Inception's
pool features play for FID:

* **Architecture.** A 3-layer MLP ``64 -> 256 -> 64 -> 10`` with ReLUs. The 64 inputs are
  the pixels, so no spatial prior is needed at this resolution (a CNN on 8x8 buys little
  accuracy and costs an order of magnitude more CPU time). The 64-dimensional ReLU layer
  before the classifier head is the feature space: it must separate the ten classes
  linearly, so it encodes digit identity, and it is a dense function of every pixel, so it
  also responds to stroke shape, noise and blur.
* **Training.** Full-precision Adam on the *training* split only, with mild Gaussian pixel
  noise as augmentation so the features vary smoothly around the data manifold rather
  than being pinned to its 17 exact grey levels (generated samples are never exactly
  quantised). The held-out accuracy is stored with the weights (``accuracy``, ~97%).
* **Split.** The same rule as :class:`noisevalue.data.digits.DigitsDataset` (``split``,
  ``holdout_fraction=0.2``, ``seed=0``): ``sklearn.model_selection.train_test_split`` of
  the indices with ``test_size=holdout_fraction, random_state=seed, stratify=labels``,
  re-implemented in :func:`digits_split` so this module does not depend on the dataset
  class. Held-out images never influence the features, so FD(train, test) measures
  generalisation, not memorisation.
* **Determinism and caching.** Training runs single-threaded under a forked, seeded RNG
  (the caller's RNG state is untouched) with deterministic ops only, and takes a few
  seconds. The weights are cached as safetensors in ``cache_dir`` (default
  ``$NOISEVALUE_CACHE`` or ``~/.cache/noisevalue``) under a name keyed by a hash of the
  hyper-parameters, written atomically (temporary file + ``os.replace``).

**At 32x32** (``digits32``, for the ``digits32`` recipe's jittered 32x32 digits,
:class:`noisevalue.data.digits.DigitsDataset` with ``image_size=32, jitter=True``) the same
classifier is trained on those 32x32 training images: ``1024 -> 256 -> 64 -> 10``, with the
same recipe, split and cache (``image_size`` and ``jitter`` join the hyper-parameters that
key it). Shrinking samples to 8x8 before the 8x8 features would be cheaper, but it would
measure something else: a 4x4 area average divides pixel noise by 4 and erases exactly the
detail a 32x32 model has to get right (stroke edges, grain, the sub-pixel placement), so a
model could be wrong at 32x32 and still score well. The 8x8 features also never saw rotated
or rescaled digits. The held-out accuracy is stored with the weights as at 8x8.

Inputs are images ``[n, 1 or 3, H, W]``: float in ``[0, 1]`` or ``uint8`` in ``[0, 255]``.
RGB is averaged to grey and any other size is resized to the classifier's (8x8, or 32x32)
with area interpolation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from noisevalue.checkpoint import atomic_file
from noisevalue.data.digits import NATIVE_SIZE, render

__all__ = [
    "DIGITS32",
    "DigitFeatureConfig",
    "DigitFeatureExtractor",
    "default_cache_dir",
    "digits_split",
]

log = logging.getLogger(__name__)

CACHE_ENV = "NOISEVALUE_CACHE"
_FORMAT_VERSION = 1  # bump when the architecture or training code changes


def default_cache_dir() -> Path:
    """``$NOISEVALUE_CACHE`` if set, else ``~/.cache/noisevalue``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "noisevalue"


def digits_split(
    split: str, holdout_fraction: float = 0.2, seed: int = 0, image_size: int = NATIVE_SIZE,
    jitter: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``"train"`` or ``"test"`` split of ``load_digits``: images float ``[n, 1, size,
    size]`` in ``[0, 1]`` (rendered as the dataset renders them) and labels long ``[n]``, in
    the order ``train_test_split`` returns them.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data = load_digits()
    labels = data.target
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=holdout_fraction, random_state=seed, stratify=labels
    )
    idx = train_idx if split == "train" else test_idx
    images = torch.from_numpy(data.images[idx] / 16.0).float().unsqueeze(1)
    return render(images, idx, image_size, jitter), torch.from_numpy(labels[idx]).long()


@dataclass(frozen=True)
class DigitFeatureConfig:
    """Hyper-parameters of the digit classifier; their hash names the cache file."""

    hidden: int = 256
    features: int = 64
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    noise_std: float = 0.05
    seed: int = 0
    holdout_fraction: float = 0.2
    split_seed: int = 0
    image_size: int = NATIVE_SIZE  # the images it reads, as the digits dataset renders them
    jitter: bool = False

    def key(self) -> str:
        fields = asdict(self)
        if self.image_size == NATIVE_SIZE and not self.jitter:
            del fields["image_size"], fields["jitter"]  # the 8x8 keys predate these fields
        blob = json.dumps({"version": _FORMAT_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: ``features: digits32`` of the fid evaluator: the digits32 recipe's images
DIGITS32 = DigitFeatureConfig(image_size=32, jitter=True)


def _build(cfg: DigitFeatureConfig) -> tuple[nn.Sequential, nn.Linear]:
    trunk = nn.Sequential(
        nn.Linear(cfg.image_size**2, cfg.hidden), nn.ReLU(),
        nn.Linear(cfg.hidden, cfg.features), nn.ReLU(),
    )
    return trunk, nn.Linear(cfg.features, 10)


def _to_gray(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[n, 1|3, H, W]`` float in [0, 1] or uint8 -> float ``[n, size**2]`` in [-1, 1]."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [n, 1 or 3, H, W], got {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="area")
    return x.flatten(1) * 2.0 - 1.0


def _train(cfg: DigitFeatureConfig) -> tuple[dict[str, torch.Tensor], float]:
    """Train deterministically; return the state dict and the held-out accuracy."""
    x_train, y_train = digits_split("train", cfg.holdout_fraction, cfg.split_seed, cfg.image_size, cfg.jitter)
    x_test, y_test = digits_split("test", cfg.holdout_fraction, cfg.split_seed, cfg.image_size, cfg.jitter)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: reductions always run in the same order
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            trunk, head = _build(cfg)
            gen = torch.Generator().manual_seed(cfg.seed)
            model = nn.Sequential(trunk, head)
            opt = torch.optim.Adam(
                model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False
            )
            inputs = _to_gray(x_train, cfg.image_size)
            for _ in range(cfg.epochs):
                order = torch.randperm(len(inputs), generator=gen)
                for start in range(0, len(order), cfg.batch_size):
                    idx = order[start : start + cfg.batch_size]
                    noise = torch.randn(len(idx), inputs.shape[1], generator=gen) * (2 * cfg.noise_std)
                    loss = F.cross_entropy(model(inputs[idx] + noise), y_train[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                pred = model(_to_gray(x_test, cfg.image_size)).argmax(dim=1)
            accuracy = float((pred == y_test).float().mean())
    finally:
        torch.set_num_threads(threads)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return state, accuracy


class DigitFeatureExtractor(nn.Module):
    """Penultimate activations of a small digit classifier: ``[n, C, H, W] -> [n, 64]``
    (8x8 digits by default; :data:`DIGITS32` for the jittered 32x32 ones).

    ``num_features`` is the feature dimension (torchmetrics reads it instead of probing).
    ``accuracy`` is the classifier's accuracy on the held-out split. The weights are
    loaded from ``cache_dir`` or trained there (a few seconds) on first use.
    """

    def __init__(
        self, config: DigitFeatureConfig | None = None, cache_dir: str | os.PathLike | None = None
    ) -> None:
        super().__init__()
        self.config = config or DigitFeatureConfig()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.num_features = self.config.features
        with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep caller's RNG
            self.trunk, self.head = _build(self.config)
        self.weights_file = self.cache_dir / f"digit_features-{self.config.key()}.safetensors"
        state, self.accuracy = self._load_or_train()
        nn.Sequential(self.trunk, self.head).load_state_dict(state)
        self.requires_grad_(False)
        self.eval()

    def _load_or_train(self) -> tuple[dict[str, torch.Tensor], float]:
        path = self.weights_file
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as fh:
                    meta = fh.metadata()
                return load_file(str(path)), float(meta["accuracy"])
            except Exception as exc:  # corrupt or foreign file: retrain over it
                log.warning("ignoring unreadable digit-feature cache %s (%s)", path, exc)
        state, accuracy = _train(self.config)
        log.info("trained digit features: held-out accuracy %.4f -> %s", accuracy, path)
        meta = {"accuracy": repr(accuracy), "config": json.dumps(asdict(self.config))}
        with atomic_file(path) as tmp:
            save_file(state, str(tmp), metadata=meta)
        return state, accuracy

    def train(self, mode: bool = True) -> DigitFeatureExtractor:
        """Frozen: always stays in evaluation mode."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(_to_gray(images, self.config.image_size).to(self.head.weight.device))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted digit class per image, long ``[n]``."""
        return self.head(self.forward(images)).argmax(dim=1)
