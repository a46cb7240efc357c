"""The abstract kinds of component noisevalue composes, and their contracts.

Each kind has a registry (see :mod:`noisevalue.registry`) fed by an entry-point group.
Interfaces hold contracts only; shared behaviour lives in plain functions elsewhere.

Shape conventions used throughout:

* ``N`` batch size, ``C, H, W`` the (latent) image shape the diffusion model sees.
* Timesteps ``t`` are integer DDPM indices in ``[0, T)`` (``T = 1000``), dtype ``long``.
* Labels ``y`` are ``long`` in ``[0, num_classes]``; the value ``num_classes`` is the
  *null* label used for classifier-free guidance. Unconditional models take ``y=None``.
  Label dropout is applied by the caller (a fixed mask drawn from a seeded generator),
  never inside a forward pass, so every forward pass is a deterministic function.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from noisevalue.distributed import DistInfo

__all__ = [
    "Backbone",
    "Rater",
    "NoiseSelector",
    "rater_need",
    "TrainingContext",
    "MetaOptimizer",
    "BilevelProblem",
    "MetaGradient",
    "Evaluator",
    "ImageDataset",
    "LatentEncoder",
]


#: the timestep value that stands for "no time condition" (see ``Backbone.time_dropout_prob``)
NULL_TIMESTEP = -1


class Backbone(nn.Module, ABC):
    """A noise-prediction network ``eps_theta(x_t, t, y)``.

    Attributes every backbone sets in ``__init__``:
        input_size, in_channels: the spatial size and channel count of ``x_t``.
        out_channels: ``in_channels`` or ``2 * in_channels`` when ``learn_sigma``;
            the first ``in_channels`` output channels are the epsilon prediction.
        num_classes: number of real classes; 0 means unconditional.
        patch_size: the spatial granularity; ``input_size`` must be divisible by it.

    ``forward(x, t, y)``: ``x`` float ``[N, in_channels, H, W]``; ``t`` long ``[N]``;
    ``y`` long ``[N]`` or ``None``. Returns float ``[N, out_channels, H, W]``.
    It must not mutate its inputs or module state (no BatchNorm, no in-forward dropout
    of labels), so that ``torch.func.functional_call`` and finite differences see a
    pure function of the parameters.
    """

    input_size: int
    in_channels: int
    out_channels: int
    num_classes: int
    patch_size: int
    learn_sigma: bool
    #: probability with which the trainer replaces a label by the null label ``num_classes``
    #: (classifier-free guidance); 0 means no null label is ever trained
    class_dropout_prob: float = 0.0
    #: probability with which the trainer replaces the timestep *condition* (not the noise
    #: level) by :data:`NULL_TIMESTEP`; a backbone that sets it > 0 maps that value to a
    #: learned null-time embedding (Noise Awareness Guidance); 0: never
    time_dropout_prob: float = 0.0
    #: set by rater meta-training (``meta.activation_checkpointing``): recompute each block's
    #: activations in the backward pass (see :mod:`noisevalue.recompute`); a backbone that
    #: cannot ignores it
    gradient_checkpointing: bool = False

    @abstractmethod
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        ...


class Rater(nn.Module, ABC):
    """Scores candidate noises: ``phi_eta(eps, t, x0, y) -> R``.

    ``forward(noise, t, x0, y)``: ``noise`` and ``x0`` float ``[N, C, H, W]`` (the same
    shape as the backbone's input); ``t`` long ``[N]``; ``y`` long ``[N]`` (possibly the
    null label) or ``None``. Returns unnormalised float scores ``[N]``; higher means the
    noise is preferred. Scores are only compared within a group of candidates that share
    ``(x0, y, t)``, so a constant offset per group is meaningless. Pure, like a Backbone.

    Attributes: ``latent_shape`` ``(C, H, W)`` and ``num_classes`` it was built for, so a
    checkpoint can be checked against the backbone it is applied to.
    """

    latent_shape: tuple[int, int, int]
    num_classes: int
    #: True when building it with its recipe parameters is quick (no file read, no large
    #: allocation): ``recipe validate`` and the start of ``run`` then build it once, so a
    #: constructor's ValueError is reported before any training (shape keywords take their
    #: defaults in that trial build).
    cheap_to_build: ClassVar[bool] = False
    #: as :attr:`Backbone.gradient_checkpointing`
    gradient_checkpointing: bool = False

    @property
    def uses_labels(self) -> bool:
        """False for a rater that ignores ``y``: it then fits data with any class count."""
        return True

    @property
    def grouped(self) -> bool:
        """True for a rater whose ``forward`` also takes the k candidates of each sample at
        once, ``noise`` ``[N, k, C, H, W]`` beside ``x0`` ``[N, C, H, W]`` and ``t``/``y``
        ``[N]``, and returns ``[N, k]``: it can then share the work that does not depend on
        the noise between them. Selection and meta-training call it that way."""
        return False

    @abstractmethod
    def forward(
        self, noise: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor:
        ...


@dataclass
class TrainingContext:
    """What the diffusion trainer hands a selector that declares ``needs_training_context``.

    ``model``: the backbone being trained (unwrapped; its weights change in place every
    step). ``diffusion``: the forward process (``q_sample``, ``per_sample_loss``).
    ``validation_batch(n)``: ``(x0, y, t, noise)`` for ``n`` held-out samples (the meta
    validation split), drawn from a generator seeded by the run's seed and the current
    ``step``, so a resumed run sees the same batches. ``optimizer``: the optimizer that
    applies the step the selector chooses noise for, its state as it is before that step
    (read it, never step it): a selector that ranks in the optimizer's own metric
    (``oracle_precond``) reads its second moments.
    """

    model: nn.Module
    diffusion: Any
    validation_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]]
    step: int = 0
    optimizer: torch.optim.Optimizer | None = None


class NoiseSelector(ABC):
    """Chooses one noise per training sample among ``k`` i.i.d. Gaussian candidates.

    ``k`` (attribute, >= 1) is how many candidates the trainer draws per sample.
    ``select(x0, y, t, candidates, *, generator)``: ``x0`` ``[N, C, H, W]``; ``y`` the
    *already dropped* labels ``[N]`` or ``None``; ``t`` ``[N]``; ``candidates``
    ``[N, k, C, H, W]``. Returns the index of the chosen candidate per sample, long ``[N]``.
    Must not mutate its inputs and must run without building an autograd graph.
    ``generator`` is a CPU ``torch.Generator`` seeded by the run's seed, the step and the
    process rank: a stochastic selector draws all its randomness from it (on the CPU, then
    moves the draws to the candidates' device), so a resumed run picks exactly what an
    uninterrupted one picks. It is ``None`` when a caller has no step (direct use).
    ``to(device)`` moves any state (e.g. a frozen rater) and returns ``self``.

    Optional declarations (class attributes; the defaults need nothing):

    * ``needs_rater``: ``"trained"`` or ``"untrained"``: the protocol fills the
      ``checkpoint`` parameter with the rater meta-trained for the run's seed, or with that
      rater's initial (untrained) weights.
    * ``needs_training_context``: the trainer calls :meth:`bind` once with a
      :class:`TrainingContext` before the first step and keeps its ``step`` current.
    * ``cheap_to_build`` (default True): ``recipe validate`` and the start of ``run`` build
      the selector once with its recipe parameters (a selector that needs a rater and has
      no ``checkpoint`` yet gets a stand-in module as ``rater``), so that a constructor's
      ``ValueError`` is reported before any training. Set False if building is costly.
    * ``pool``: ``"sample"`` (default) when each sample picks among its own k candidates,
      ``"batch"`` when the returned indices point into all ``N * k`` candidates of the
      process's batch, flattened sample-major (``candidates.flatten(0, 1)``): a selector may
      then pair noises to samples across the batch, as a batch assignment does. It is
      called even with k = 1.
    * ``last_gain`` (an attribute a selector may set in ``select``): ``[N]``, what each
      pick gains over candidate 0 by the selector's own first-order measure (the oracle's
      alignment difference); the trainer's noise diagnostics average it per timestep bin.
    """

    k: int = 1
    pool: ClassVar[Literal["sample", "batch"]] = "sample"
    needs_rater: ClassVar[Literal["trained", "untrained"] | None] = None
    needs_training_context: ClassVar[bool] = False
    cheap_to_build: ClassVar[bool] = True

    @abstractmethod
    def select(
        self,
        x0: torch.Tensor,
        y: torch.Tensor | None,
        t: torch.Tensor,
        candidates: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        ...

    def to(self, device: torch.device | str) -> NoiseSelector:
        return self

    def bind(self, context: TrainingContext) -> None:  # noqa: B027 (optional hook, no-op default)
        """Receive the trainer's context (only called with ``needs_training_context``)."""

    def check_compatible(self, latent_shape: tuple[int, ...], num_classes: int) -> None:  # noqa: B027
        """Raise ``CheckpointError`` (one line) if the selector cannot serve this data, e.g. a
        rater trained for other latents. Called once before training; the default accepts all."""


def rater_need(factory: object) -> Literal["trained", "untrained"] | None:
    """The rater a registered selector factory declares it needs (``needs_rater``); a plain
    function factory declares nothing."""
    if isinstance(factory, type) and issubclass(factory, NoiseSelector):
        return factory.needs_rater
    return None


Params = dict[str, torch.Tensor]


@dataclass
class BilevelProblem:
    """One outer step of rater meta-training, expressed functionally.

    ``inner_loss(theta, eta, batch)`` is the rater-weighted diffusion loss (a scalar) of the
    backbone parameters ``theta`` given rater parameters ``eta`` on one grouped batch.
    ``outer_loss(theta, batch)`` is the plain diffusion loss on a validation batch.
    ``inner_batches`` holds the S batches of the inner loop (fixed noises, timesteps and
    label masks, so the function differentiated is deterministic); ``inner_optimizer`` and
    ``inner_lr`` / ``inner_options`` describe the diffusion optimizer that is unrolled
    (``"sgd"``, ``"adam"`` or ``"adamw"``). ``inner_state`` is the state that optimizer
    starts from (``{"m": ..., "v": ...}`` for Adam, ``{"buf": ...}`` for SGD with
    momentum, each keyed like ``theta``), for example the diffusion trainer's moments saved
    in its checkpoint, and ``inner_step`` the number of steps it has already taken; ``None``
    and 0 mean a fresh optimizer.
    """

    inner_loss: Callable[[Params, Params, Any], torch.Tensor]
    outer_loss: Callable[[Params, Any], torch.Tensor]
    inner_batches: list[Any]
    val_batch: Any
    inner_optimizer: str = "sgd"
    inner_lr: float = 1e-4
    inner_options: dict[str, Any] = field(default_factory=dict)
    inner_state: dict[str, Params] | None = None
    inner_step: int = 0
    #: the losses recompute activations in backward: gradients must come from torch.autograd
    checkpointed: bool = False
    #: engines take gradients and second-order products over this many parts of each batch,
    #: one at a time (the losses must be means over dim 0 of the batch tensors)
    chunks: int = 1
    #: attention on the differentiation paths: ``None`` PyTorch's math kernel (full attention
    #: matrices kept for every derivative); an int, blocked attention over that many queries
    #: at a time, recomputed in every derivative (:mod:`noisevalue.attention`)
    attention_block: int | None = None


@dataclass
class MetaGradient:
    """What a meta-optimizer returns for one outer step."""

    grad: Params  # d L_val(theta_S(eta)) / d eta, same keys and shapes as ``eta``
    theta: Params  # theta_S, detached, for the "carry theta along" option
    outer_loss: float
    info: dict[str, float] = field(default_factory=dict)  # e.g. solver residual
    inner_state: dict[str, Params] | None = None  # the optimizer state at theta_S, if unrolled


class MetaOptimizer(ABC):
    """Computes the rater's meta-gradient for one outer step.

    ``meta_gradient(problem, theta, eta)`` takes detached parameter dicts; it must not
    mutate them, and returns a :class:`MetaGradient`. Implementations run their
    differentiation paths under :func:`noisevalue.meta.problem.meta_attention` and keep
    solver arithmetic in float32 or wider.
    ``cheap_to_build`` (default True): ``recipe validate`` builds it once to check its values.
    """

    cheap_to_build: ClassVar[bool] = True

    @property
    def supports_checkpointing(self) -> bool:
        """Whether it differentiates by reverse mode only (``torch.autograd``), so that the
        backbone and rater may recompute activations (``meta.activation_checkpointing``);
        forward-mode AD and ``torch.func`` transforms cannot run through recomputation."""
        return False

    @abstractmethod
    def meta_gradient(self, problem: BilevelProblem, theta: Params, eta: Params) -> MetaGradient:
        ...


class LossWeighting(ABC):
    """A weight per training sample, from the signal-to-noise ratio of its timestep,
    multiplying its epsilon loss: ``weight(snr)`` takes ``SNR_t = abar_t / (1 - abar_t)``
    ``[N]`` (float64; 0 at the last timestep of a zero-terminal-SNR schedule) and returns
    non-negative weights ``[N]``. The held-out loss used as the evaluation metric stays
    unweighted, so methods are compared on one scale. ``cheap_to_build`` (default True).
    """

    cheap_to_build: ClassVar[bool] = True

    @abstractmethod
    def weight(self, snr: torch.Tensor) -> torch.Tensor:
        ...


class TimestepSampler(ABC):
    """The distribution of training timesteps (``train.timestep_sampler``).

    Each step the trainer draws the global batch's timesteps uniformly as always, then calls
    ``resample(t, u)`` with ``u`` uniform in ``[0, 1)`` (``[N]`` float64, from the step's own
    seeded stream): return the timesteps to train on, e.g. by inverse CDF of ``u``. After
    the step, ``statistics(t, losses)`` may summarise this process's per-sample (unweighted)
    epsilon losses (on the training device) into a fixed-shape float64 tensor; the trainer sums it over processes and
    passes it to ``update(stats, step)``, so every process holds the same state. An
    adaptive sampler keeps that state in ``state_dict`` (tensors, saved with each
    checkpoint and restored on resume, so a resumed run draws exactly what an
    uninterrupted one does). ``cheap_to_build`` (default True).
    """

    cheap_to_build: ClassVar[bool] = True

    def bind(self, alphas_cumprod: torch.Tensor, loss_weight: torch.Tensor) -> None:  # noqa: B027
        """Called once before training with the schedule's ``abar_t`` and the run's loss
        weight at each timestep (both float64 ``[T]``)."""

    @abstractmethod
    def resample(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ...

    def statistics(self, t: torch.Tensor, losses: torch.Tensor) -> torch.Tensor | None:
        """None (the default): the sampler does not adapt."""
        return None

    def update(self, stats: torch.Tensor, step: int) -> None:  # noqa: B027
        """Take the summed statistics of the step that ends at ``step`` (1-based)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")


class Evaluator(ABC):
    """Scores generated images against a reference set.

    ``prepare(reference)`` consumes an iterable of float ``[n, C, H, W]`` batches in
    ``[0, 1]`` (pixel space) and may cache reference statistics; ``evaluate(generated)``
    consumes batches of the same form and returns named numbers, e.g. ``{"fid": 12.3}``.
    ``evaluate`` may be called several times after one ``prepare``.

    In a run of several processes the images are drawn by all of them. An evaluator whose
    statistics combine across processes (sums, gathered features) says so in :meth:`join`;
    every process then calls ``prepare`` and ``evaluate`` with its own share of the images,
    and the numbers ``evaluate`` returns on rank 0 are the whole set's. Otherwise rank 0
    alone evaluates, the other processes streaming their images to it.
    """

    def join(self, info: DistInfo) -> bool:
        """Called once, on every process of a multi-process run, before ``prepare``: return
        True to take this process's share of the images and combine the shares yourself
        (collectives on the default process group, in the same order on every rank);
        False (the default) to be given every image on rank 0 only."""
        return False

    @abstractmethod
    def prepare(self, reference: Iterable[torch.Tensor]) -> None:
        ...

    @abstractmethod
    def evaluate(self, generated: Iterable[torch.Tensor]) -> Mapping[str, float]:
        ...

    # Optional: reference statistics that ``noisevalue eval`` caches and reuses. An evaluator
    # that keeps none leaves these as they are; its reference images are then read each time.
    def reference_key(self) -> dict[str, Any] | None:
        """What this evaluator's reference statistics depend on (feature space, weights
        file, ...), JSON-able; None (the default) when it has none to cache."""
        return None

    def save_reference(self, path: Path) -> None:
        """Write the statistics :meth:`prepare` computed to ``path`` (called only when
        :meth:`reference_key` is not None)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no reference statistics")

    def load_reference(self, path: Path) -> None:
        """Use statistics from ``path`` (written by :meth:`save_reference`, or a file in the
        same format) instead of calling :meth:`prepare`."""
        raise NotImplementedError(f"{type(self).__name__} keeps no reference statistics")


class ImageDataset(Dataset, ABC):
    """A dataset of images with optional class labels.

    ``__getitem__(i)`` returns ``(image, label)``: ``image`` float ``[channels, image_size,
    image_size]`` in ``[-1, 1]``; ``label`` an int in ``[0, num_classes)`` (0 when
    ``num_classes == 0``). Attributes: ``num_classes``, ``channels``, ``image_size``.
    Missing or empty data raises :class:`noisevalue.errors.DataError`.
    """

    num_classes: int
    channels: int
    image_size: int

    @abstractmethod
    def __len__(self) -> int:
        ...

    @abstractmethod
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        ...


class LatentEncoder(nn.Module, ABC):
    """Maps images in ``[-1, 1]`` to the space the diffusion model works in, and back.

    ``latent_shape(channels, image_size)`` gives ``(C, H, W)`` of the latents.
    ``encode(images)`` returns scaled latents (``scale * z``); ``decode`` inverts it back to
    images in roughly ``[-1, 1]``. ``cacheable``: whether encoding is expensive enough that
    the trainer should encode the dataset once into an on-disk latent cache.
    ``pixel_space``: the latents are the images themselves (no encoding), so the training
    images can serve directly as the sample metrics' reference.
    """

    cacheable: bool = False
    pixel_space: bool = False

    @abstractmethod
    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int, int]:
        ...

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        ...
