"""Fréchet distances between generated and reference images (FID and friends).

:class:`FIDEvaluator` uses torchmetrics' ``FrechetInceptionDistance`` as its engine: it
runs the feature extractor and accumulates the feature sums and outer products (float64)
of the reference ("real") and generated ("fake") sets. The distance itself is computed
from those statistics by :func:`frechet_distance` (float64, symmetric eigen-decomposition,
see below) so that precomputed reference statistics (an ``.npz`` with ``mu`` and
``sigma``, the ADM evaluation-suite format) plug in without recomputing anything.

Feature spaces (``features``):

* ``"inception"`` -- the standard FID: 2048-d pool features of the TF-FID InceptionV3.
  The weights are never downloaded: pass the local weights file as ``weights_path``.
  Images are clamped to ``[0, 1]`` and *rounded* to ``uint8`` (as when samples are saved
  to PNG) before the network; 1-channel images are repeated to RGB. ``antialias=False``
  (the default here) resizes to 299x299 with the TF1-compatible bilinear resize of the
  original TF-FID and of the ADM reference numbers; torchmetrics >= 1.8 defaults to an
  antialiased resize (``antialias=True``), which shifts FID values, so set it only to
  match numbers computed that way. The metric is reported as ``"fid"``.
* ``"digits"`` -- penultimate features of a small classifier trained on the 8x8 digits
  training split (:mod:`noisevalue.evaluators.digit_features`; no download). Reported as
  ``"fd_digits"``: a Fréchet distance in a different feature space is *not* an FID and
  must not be compared with published FIDs.
* ``"digits32"`` -- the same classifier trained on the ``digits32`` recipe's jittered 32x32
  digits, reported as ``"fd_digits32"`` (not comparable with ``"fd_digits"`` either).
* ``feature_extractor=module`` (programmatic use): any ``nn.Module`` mapping float images
  in ``[0, 1]`` to ``[n, d]`` features and exposing ``num_features = d``. Reported as
  ``metric_name`` (default ``"fd_custom"``).

``kid=True`` also reports the Kernel Inception Distance in the same feature space (``"kid"``,
``"kid_digits"``, ``"kid_digits32"``, ``"kid_custom"``) from the very features the Fréchet distance used (a
forward hook on torchmetrics' extractor, so nothing is extracted twice): the unbiased
estimate of the squared MMD with torchmetrics' cubic polynomial kernel, over all reference
and generated features at once (no random subsets, so it is deterministic, and the two sets
may differ in size). Unlike the Fréchet distance it is unbiased in the number of samples.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from noisevalue.checkpoint import atomic_file
from noisevalue.distributed import DistInfo, all_reduce_sum, gather_rows
from noisevalue.errors import ConfigError, WeightsUnavailableError
from noisevalue.files import file_digest, state_digest
from noisevalue.interfaces import Evaluator

__all__ = [
    "FIDEvaluator",
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "feature_statistics",
    "frechet_distance",
    "kernel_distance",
]

# torch-fidelity's release of the TF-FID InceptionV3 weights (2015-12-05), which torchmetrics
# would otherwise download itself.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
# ADM's (guided-diffusion's) evaluation suite: reference batches with their Inception statistics
ADM_REFERENCES = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)
_HOW_TO_GET_WEIGHTS = (
    f"download {INCEPTION_WEIGHTS_FILE} (the pt_inception-2015-12-05 FID weights) from "
    f"{INCEPTION_WEIGHTS_URL} and set this key to the file (or features: digits for 8x8 digits)"
)
FEATURE_SPACES = ("inception", "digits", "digits32")


def _float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[d]`` and unbiased covariance ``[d, d]`` (float64) of features ``[n, d]``."""
    f = _float64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [n >= 2, d], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance; round-off negative eigenvalues count as 0."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` in float64.

    ``Tr (S1 S2)^{1/2}`` equals the sum of singular values of ``S2^{1/2} S1^{1/2}`` (both
    PSD square roots from a symmetric eigen-decomposition). Unlike ``scipy.linalg.sqrtm``
    of the non-symmetric ``S1 S2`` this needs no eps-offset fallback for singular
    covariances (fewer samples than features) and never goes complex, and unlike the
    eigenvalues of ``S1 S2`` it takes no square root of round-off-sized eigenvalues, so a
    set against itself gives 0 to round-off. Values below 0 (round-off) are clamped to 0.
    """
    m1, m2 = _float64(mu1).reshape(-1), _float64(mu2).reshape(-1)
    s1, s2 = _float64(sigma1), _float64(sigma2)
    d = m1.shape[0]
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {m1.shape}, sigma1 {s1.shape}, mu2 {m2.shape}, sigma2 {s2.shape}"
        )
    if not all(np.isfinite(a).all() for a in (m1, m2, s1, s2)):
        raise ValueError("non-finite values in the feature statistics")
    return _frechet(m1, s1, _psd_sqrt(s1), m2, s2, _psd_sqrt(s2))


def _frechet(*stats: np.ndarray) -> float:
    """``frechet_distance`` given ``(mu1, sigma1, sqrt(sigma1), mu2, sigma2, sqrt(sigma2))``."""
    m1, s1, root1, m2, s2, root2 = stats
    tr_covmean = np.linalg.svd(root2 @ root1, compute_uv=False).sum()
    diff = m1 - m2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return max(float(value), 0.0)


class FIDEvaluator(Evaluator):
    """Fréchet distance between generated and reference images in a feature space.

    Args:
        features: ``"inception"`` (FID, needs ``weights_path``), ``"digits"`` or
            ``"digits32"``.
        weights_path: local InceptionV3 FID weights file (``features="inception"``).
        antialias: antialiased resize to 299x299 (torchmetrics >= 1.8 only); keep False
            to match TF-FID / ADM numbers.
        reference_stats: ``.npz`` with ``mu`` and ``sigma`` used as the reference
            statistics; ``prepare`` then does not read its images.
        batch_size: images per feature-extractor call.
        device: where features are extracted.
        cache_dir: where the digit-feature weights are cached (``features="digits"``,
            ``"digits32"``).
        feature_extractor: a custom feature ``nn.Module`` (overrides ``features``).
        metric_name: key of the result; defaults to ``"fid"``, ``"fd_digits"``,
            ``"fd_digits32"``, ``"fd_custom"`` by feature space.
        kid: also report the KID (needs reference images, not ``reference_stats``).
    """

    def __init__(
        self,
        features: str = "inception",
        weights_path: str | os.PathLike | None = None,
        antialias: bool = False,
        reference_stats: str | os.PathLike | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        cache_dir: str | os.PathLike | None = None,
        feature_extractor: nn.Module | None = None,
        metric_name: str | None = None,
        kid: bool = False,
    ) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        if feature_extractor is None and features not in FEATURE_SPACES:
            raise ConfigError(f"features must be one of {FEATURE_SPACES}, got {features!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(antialias, bool):
            raise ConfigError(f"antialias must be true or false, got {antialias!r}")
        self.features = "custom" if feature_extractor is not None else features
        self.antialias = antialias
        if self.features != "inception" and (weights_path is not None or antialias):
            raise ConfigError("weights_path and antialias apply only to features=inception")
        self.metric_name = metric_name or {"inception": "fid"}.get(
            self.features, f"fd_{self.features}"
        )
        if not isinstance(kid, bool):
            raise ConfigError(f"kid must be true or false, got {kid!r}")
        if kid and reference_stats is not None:
            raise ConfigError("kid needs the reference images' features; reference_stats holds only mu and sigma")
        self.kid_name = ("kid" if self.features == "inception" else f"kid_{self.features}") if kid else None
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.reference_stats = Path(reference_stats).expanduser() if reference_stats else None
        if self.reference_stats is not None and not self.reference_stats.is_file():
            where = (f"; ADM's reference batches are at {ADM_REFERENCES}/imagenet/256/{self.reference_stats.name}"
                     if self.reference_stats.name.startswith("VIRTUAL_imagenet") else "")
            raise ConfigError(f"reference_stats file '{self.reference_stats}' not found{where}")

        options: dict = {"reset_real_features": False}
        if self.features == "inception":
            options.update(feature=2048, normalize=False)  # we quantise to uint8 ourselves
            self._weights_path = _inception_weights(weights_path)
            state = _tensors_only(self._weights_path)  # never unpickles objects from the user's file
            if "antialias" in inspect.signature(FrechetInceptionDistance.__init__).parameters:
                options["antialias"] = antialias
            elif antialias:
                raise ConfigError("antialias=true needs torchmetrics >= 1.8")
        else:
            if feature_extractor is None:
                from noisevalue.evaluators.digit_features import DigitFeatureExtractor

                feature_extractor = DigitFeatureExtractor(_digit_config(self.features), cache_dir=cache_dir)
            if not isinstance(getattr(feature_extractor, "num_features", None), int):
                raise ConfigError("a custom feature_extractor must expose num_features (int)")
            options.update(feature=feature_extractor, normalize=True)  # float images pass through
        try:
            if self.features == "inception":
                with _as_plain_file(state) as clean:  # torch-fidelity loads a path: give it our own copy
                    self.metric = FrechetInceptionDistance(**options, feature_extractor_weights_path=clean)
            else:
                self.metric = FrechetInceptionDistance(**options)
        except Exception as exc:  # no torch-fidelity, or an unreadable/mismatching weights file
            if self.features != "inception":
                raise
            detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            raise WeightsUnavailableError(
                f"params.weights_path: could not build the FID InceptionV3 from '{weights_path}' ({detail}; it needs "
                "torch-fidelity installed); " + _HOW_TO_GET_WEIGHTS
            ) from exc
        self.metric.to(self.device)
        self.num_features = int(self.metric.real_features_sum.shape[0])
        self._captured: list[torch.Tensor] | None = None  # features seen by the extractor (KID)
        self._reference_features: torch.Tensor | None = None
        self._last_features: torch.Tensor | None = None
        if self.kid_name is not None:
            self.metric.inception.register_forward_hook(self._capture)
        self._reference: tuple[np.ndarray, np.ndarray] | None = None
        self._reference_root: np.ndarray | None = None
        self._reference_count: int | None = None  # images behind the reference statistics
        self._group: DistInfo | None = None  # the process group whose shares this evaluator combines
        self._weights_digest: str | None = None

    # -- several processes ------------------------------------------------------------
    def join(self, info: DistInfo) -> bool:
        """Each process passes its share of the images; the feature sums and second moments
        (float64) are summed over the processes and, for the KID, the features gathered on
        rank 0, where the distances are computed (the other ranks return no metrics)."""
        self._group = info
        return True

    @property
    def _main(self) -> bool:
        return self._group is None or self._group.is_main

    def _combine(self, side: str) -> None:
        """Sum ``side``'s statistics over the joined processes; the KID features to rank 0."""
        if self._group is None or not self._group.distributed:
            return
        m = self.metric
        for name in (f"{side}_features_sum", f"{side}_features_cov_sum", f"{side}_features_num_samples"):
            all_reduce_sum(getattr(m, name), self._group)
        if self.kid_name is not None:
            mine = self._last_features if self._last_features is not None else torch.zeros(0, self.num_features)
            self._last_features = gather_rows(mine.to(self._group.device), self._group)
            if self._last_features is not None:
                self._last_features = self._last_features.cpu()

    # -- reference side -------------------------------------------------------------
    def prepare(self, reference: Iterable[torch.Tensor]) -> None:
        """Compute (or load from ``reference_stats``) the reference statistics once."""
        if self.reference_stats is not None:
            mu, sigma, self._reference_count = self._load_stats(self.reference_stats)
            self._use_reference(mu, sigma)
            return
        self.metric.reset_real_features = True
        self.metric.reset()
        self.metric.reset_real_features = False
        self._accumulate(reference, real=True)
        self._combine("real")
        self._reference_count = int(self.metric.real_features_num_samples)
        self._reference_features = self._last_features
        if self._main:
            mu, sigma = self._statistics(real=True)
            self._reference, self._reference_root = (mu, sigma), _psd_sqrt(sigma)  # reused by every evaluate

    def _use_reference(self, mu: np.ndarray, sigma: np.ndarray) -> None:
        """Reference statistics from a file, used exactly as read (a cached reference gives
        the distances of the computed one to the last bit)."""
        self._set_real_state(mu, sigma, self._reference_count or 2)
        self._reference, self._reference_root = (mu, sigma), _psd_sqrt(sigma)

    @property
    def reference_count(self) -> int | None:
        """Images behind the reference statistics (None when a stats file does not say)."""
        return self._reference_count

    @property
    def reference_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, sigma)`` of the reference set, float64 (after :meth:`prepare`)."""
        if self._reference is None:
            raise RuntimeError("call prepare() before using the reference statistics")
        return self._reference

    def save_reference_stats(self, path: str | os.PathLike) -> None:
        """Write ``mu``, ``sigma`` (the image count ``n`` if known, and the KID's reference
        features when ``kid``) to ``.npz``, atomically."""
        mu, sigma = self.reference_statistics
        arrays: dict[str, np.ndarray] = {"mu": mu, "sigma": sigma}
        if self._reference_count is not None:
            arrays["n"] = np.asarray(self._reference_count)
        if self.kid_name is not None and self._reference_features is not None:
            # the extractor's float32 features: exact through float64 and back
            arrays["features"] = self._reference_features.float().numpy()
        with atomic_file(Path(path).expanduser()) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]

    def reference_key(self) -> dict[str, Any] | None:
        """The feature space and what computes it: a digest of the Inception weights' tensors
        (wherever the file lies), the digit classifier's settings (None for a custom
        ``feature_extractor``, which cannot be identified); the stats file when the
        reference comes from one, and whether the KID's features are kept."""
        if self.features == "inception":
            if self._weights_digest is None:
                self._weights_digest = state_digest(_tensors_only(self._weights_path))
            key: dict[str, Any] = {"features": "inception", "antialias": self.antialias,
                                   "weights_sha256": self._weights_digest}
        elif self.features in ("digits", "digits32"):
            key = {"features": self.features, "digit_features": _digit_config(self.features).key()}
        else:
            return None
        if self.reference_stats is not None:
            key["reference_stats_sha256"] = file_digest(self.reference_stats)
        if self.kid_name is not None:
            key["kid_features"] = True
        return key

    def save_reference(self, path: Path) -> None:
        self.save_reference_stats(path)

    def load_reference(self, path: Path) -> None:
        mu, sigma, self._reference_count = self._load_stats(Path(path))
        if self.kid_name is not None:
            with np.load(path) as data:
                if "features" not in data.files:
                    raise ConfigError(f"'{path}': kid needs the reference images' features; it holds only mu and sigma")
                self._reference_features = torch.from_numpy(data["features"]).double()
        self._use_reference(mu, sigma)

    def _load_stats(self, path: Path) -> tuple[np.ndarray, np.ndarray, int | None]:
        try:
            data = np.load(path)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            with data:
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
                n = int(data["n"]) if "n" in data.files else None
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(
                f"reference_stats '{path}' is not an .npz with mu and sigma: {exc}"
            ) from exc
        d = self.num_features
        if mu.shape != (d,) or sigma.shape != (d, d):
            raise ConfigError(
                f"reference_stats '{path}' has mu {mu.shape} / sigma {sigma.shape}, "
                f"but the {self.features} features have dimension {d}"
            )
        return mu, sigma, n if n is None or n >= 2 else None

    def _set_real_state(self, mu: np.ndarray, sigma: np.ndarray, n: int) -> None:
        """Write stats into torchmetrics' real-side state so its ``compute`` agrees too."""
        m = self.metric
        mu_t = torch.from_numpy(mu).to(m.real_features_sum)
        sigma_t = torch.from_numpy(sigma).to(m.real_features_cov_sum)
        m.real_features_sum = mu_t * n
        m.real_features_cov_sum = sigma_t * (n - 1) + n * torch.outer(mu_t, mu_t)
        m.real_features_num_samples = torch.tensor(n, device=m.real_features_sum.device)

    # -- generated side -------------------------------------------------------------
    def evaluate(self, generated: Iterable[torch.Tensor]) -> Mapping[str, float]:
        """Fréchet distance of ``generated`` to the reference; repeatable after one prepare.
        Joined to several processes: this process's share, the metrics on rank 0 ({} elsewhere)."""
        self.metric.reset()  # generated side only (reset_real_features=False)
        self._accumulate(generated, real=False)
        self._combine("fake")
        if not self._main:
            return {}
        mu_ref, sigma_ref = self.reference_statistics
        mu, sigma = self._statistics(real=False)
        assert self._reference_root is not None  # set with the reference statistics
        value = _frechet(mu, sigma, _psd_sqrt(sigma), mu_ref, sigma_ref, self._reference_root)
        if self.kid_name is None:
            return {self.metric_name: value}
        assert self._reference_features is not None and self._last_features is not None
        kid = kernel_distance(self._reference_features, self._last_features)
        return {self.metric_name: value, self.kid_name: kid}

    # -- helpers ----------------------------------------------------------------------
    def _statistics(self, real: bool) -> tuple[np.ndarray, np.ndarray]:
        side = "real" if real else "fake"
        n = int(getattr(self.metric, f"{side}_features_num_samples"))
        if n < 2:
            which = "reference" if real else "generated"
            raise ConfigError(f"a Fréchet distance needs at least 2 {which} images, got {n}")
        total = _float64(getattr(self.metric, f"{side}_features_sum"))
        outer = _float64(getattr(self.metric, f"{side}_features_cov_sum"))
        if not (np.isfinite(total).all() and np.isfinite(outer).all()):
            raise ValueError("non-finite image features (NaN or inf in the images?)")
        mu = total / n
        sigma = (outer - n * np.outer(mu, mu)) / (n - 1)
        return mu, (sigma + sigma.T) / 2

    def _capture(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        if self._captured is not None:
            self._captured.append(output.detach().reshape(output.shape[0], -1).double().cpu())

    def _accumulate(self, batches: Iterable[torch.Tensor], real: bool) -> None:
        self._captured = [] if self.kid_name is not None else None
        with torch.no_grad():
            for batch in batches:
                if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
                    raise ValueError("expected image batches as tensors [n, C, H, W]")
                for chunk in batch.split(self.batch_size):
                    self.metric.update(self._convert(chunk.to(self.device)), real=real)
        self._last_features = torch.cat(self._captured) if self._captured else None
        self._captured = None

    def _convert(self, images: torch.Tensor) -> torch.Tensor:
        if self.features != "inception":  # custom and digit features take float in [0, 1]
            return images.float() / 255 if images.dtype == torch.uint8 else images.float()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] != 3:
            raise ValueError(f"Inception features need 1 or 3 channels, got {images.shape[1]}")
        if images.dtype == torch.uint8:
            return images.contiguous()
        return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def kernel_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """KID: the unbiased estimate of ``MMD^2`` between two feature sets ``[m, d]`` and
    ``[n, d]`` (sizes may differ) with torchmetrics' polynomial kernel
    ``(x.y / d + 1)^3``: off-diagonal means within each set minus twice the cross mean."""
    from torchmetrics.image.kid import poly_kernel

    m, n = real.shape[0], fake.shape[0]
    if m < 2 or n < 2:
        raise ConfigError(f"KID needs at least 2 reference and 2 generated images, got {m} and {n}")
    real, fake = real.double(), fake.double()
    gamma = 1.0 / real.shape[1]

    def total(a: torch.Tensor, b: torch.Tensor, block: int = 4096) -> torch.Tensor:
        # blockwise: 50k x 50k kernel matrices never exist at once
        return sum((poly_kernel(a[i:i + block], b, gamma=gamma).sum() for i in range(0, len(a), block)),
                   start=torch.zeros((), dtype=torch.float64))

    def diagonal(a: torch.Tensor) -> torch.Tensor:
        return ((a * a).sum(dim=1) * gamma + 1.0).pow(3).sum()

    within_r = (total(real, real) - diagonal(real)) / (m * (m - 1))
    within_f = (total(fake, fake) - diagonal(fake)) / (n * (n - 1))
    return float(within_r + within_f - 2 * total(real, fake) / (m * n))


def _digit_config(features: str) -> Any:
    """The digit classifier of feature space ``digits`` (8x8) or ``digits32``."""
    from noisevalue.evaluators.digit_features import DIGITS32, DigitFeatureConfig

    return DIGITS32 if features == "digits32" else DigitFeatureConfig()


def _tensors_only(path: str) -> dict[str, torch.Tensor]:
    """The weights file's state dict, read with ``weights_only=True``: a file that would
    unpickle anything but tensors and plain containers is refused, so no code in it runs."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsUnavailableError(
            f"params.weights_path: file '{path}' is not a plain tensor file, refused ({reason[:160]}); "
            + _HOW_TO_GET_WEIGHTS
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"params.weights_path: file '{path}' holds no state dict of tensors; "
                                      + _HOW_TO_GET_WEIGHTS)
    return state


@contextlib.contextmanager
def _as_plain_file(state: dict[str, torch.Tensor]) -> Iterator[str]:
    """``state`` saved by us into a private temporary file (tensors only), for libraries that
    take a path and load it with full unpickling; removed afterwards."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="noisevalue-weights-")
    try:
        path = os.path.join(folder, "inception.pth")
        torch.save(state, path)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _inception_weights(weights_path: str | os.PathLike | None) -> str:
    """The checked local weights path; never lets torchmetrics reach for the network."""
    if weights_path is None or str(weights_path).strip() == "":
        raise WeightsUnavailableError(
            "params.weights_path: not set, and the FID Inception weights are not downloaded: " + _HOW_TO_GET_WEIGHTS
        )
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"params.weights_path: file '{path}' not found: " + _HOW_TO_GET_WEIGHTS
        )
    return str(path)
