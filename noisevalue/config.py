"""Recipes: YAML files loaded with OmegaConf and validated by pydantic models.

A recipe names components by their registry name plus parameters; it never imports code.
Loading goes: YAML -> OmegaConf (``a.b=1`` overrides, ``~a.b`` deletions, ``${...}``
interpolation) -> plain dict -> :class:`Recipe` (``extra="forbid"``: a misspelled key is an
error naming its path) -> :func:`check_components` (names exist, parameters accepted).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from noisevalue.errors import ConfigError

BUILTIN_RECIPES = "noisevalue.builtin_recipes"
DEFAULT_RECIPE = "digits"


#: the file name of the resolved recipe written into every run folder
RESOLVED_RECIPE = "recipe.yaml"
#: the settings a stage ran with (flat dotted keys), written into every stage folder
STAGE_SETTINGS = "stage.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class Component(_Strict):
    """A registered component: its registry ``name`` and constructor ``params``."""

    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


class DataConfig(_Strict):
    dataset: Component
    eval_dataset: Component | None = None  # reference images for evaluation
    encoder: Component = Field(default_factory=lambda: Component(name="identity"))
    latent_cache: str | None = None  # default: <output_dir>/latents
    cache_shard_size: int = Field(default=4096, gt=0)
    encode_batch_size: int = Field(default=64, gt=0)
    random_flip: bool = False
    # image readers (data-loader workers) per process while encoding the latent cache; auto:
    # resolved where it is used (train.data.loader_workers), 8 on CUDA, 0 on the CPU
    num_workers: int | Literal["auto"] = "auto"
    # the latent cache's storage dtype (part of its identity: another dtype is another cache)
    cache_dtype: Literal["float32", "float16"] = "float32"

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError(f"expected auto or a number of workers >= 0; got {value!r}")


class DiffusionConfig(_Strict):
    num_timesteps: int = Field(default=1000, gt=1)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = Field(default=1e-4, gt=0, lt=1)
    beta_end: float = Field(default=0.02, gt=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> DiffusionConfig:
        if self.beta_end <= self.beta_start:
            raise ValueError("beta_end must be greater than beta_start")
        return self


class TrainConfig(_Strict):
    steps: int = Field(default=1000, ge=0)
    global_batch_size: int = Field(default=256, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(default=1e-8, gt=0)
    ema_decay: float = Field(default=0.9999, ge=0, lt=1)
    ema_warmup: bool = False  # decay min(ema_decay, (1+n)/(10+n)) at update n; DiT uses none
    grad_clip: float | None = Field(default=None, gt=0)
    # a non-finite loss or gradient: stop (naming the last good checkpoint), or skip the
    # step (no update, no EMA) at most max_skips times, then stop
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skips: int = Field(default=10, ge=0)
    log_every: int = Field(default=50, gt=0)
    ckpt_every: int = Field(default=1000, gt=0)
    keep_checkpoints: int = Field(default=2, ge=1)
    keep_every: int | None = Field(default=None, gt=0)  # also keep checkpoints at multiples
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast and torch.compile when the run is on CUDA, fp32 eager on the CPU
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool | Literal["auto"] = "auto"
    threads: int | None = Field(default=None, gt=0)  # torch.set_num_threads on CPU
    # on CUDA, float32 matmuls and convolutions on TF32 tensor cores (the fp32 paths: meta-
    # training's default precision, the held-out loss, the oracle); false: strict float32
    tf32: bool = True
    # seconds a collective waits for the slowest process before a multi-process run stops
    dist_timeout: float = Field(default=1800.0, gt=0)
    # how each training sample's noise is chosen among k i.i.d. candidates (k=1: vanilla)
    selector: Component = Field(default_factory=lambda: Component(name="random", params={"k": 1}))
    # a weight per sample from its timestep's SNR on the epsilon loss (uniform: none)
    loss_weighting: Component = Field(default_factory=lambda: Component(name="uniform"))
    # the distribution of training timesteps (uniform: every t equally often)
    timestep_sampler: Component = Field(default_factory=lambda: Component(name="uniform"))
    # start from another run's checkpoint (model, EMA, optimizer, step): a continuation
    init_from: str | None = None
    # simple: the epsilon MSE; hybrid: plus the variational bound's term that trains the
    # learned variance (DiT's L_simple + L_vlb; needs model.params.learn_sigma: true)
    loss: Literal["simple", "hybrid"] = "simple"

    @model_validator(mode="after")
    def _device_defaults(self) -> TrainConfig:
        """Resolve ``auto`` precision and compile for the device the run will use."""
        if self.precision == "auto" or self.compile == "auto":
            cuda = uses_cuda(self.device)
            if self.precision == "auto":
                self.precision = "bf16" if cuda else "fp32"
            if self.compile == "auto":
                self.compile = cuda
        return self


def uses_cuda(device: str) -> bool:
    """Whether ``train.device`` puts the run on a GPU on this machine."""
    if device == "cpu":
        return False
    import torch

    return device == "cuda" or torch.cuda.is_available()


InnerOptimizerName = Literal["sgd", "adamw_checkpoint", "adamw_fresh"]
INNER_OPTIMIZERS: dict[str, str] = {
    "sgd": "plain SGD, the paper's Eq. 4: theta <- theta - lr * grad (no state)",
    "adamw_checkpoint": "the diffusion trainer's AdamW resumed from the moments and step count "
    "saved in meta.pretrained (Algorithm 1's optimizer D with its state)",
    "adamw_fresh": "AdamW from zero moments every outer step (a weak baseline: its first steps "
    "are close to lr * sign(grad))",
}


class MetaConfig(_Strict):
    """Stage (ii): bilevel meta-training of the rater on a frozen diffusion checkpoint."""

    optimizer: Component = Field(default_factory=lambda: Component(name="unrolled"))
    # recompute the backbone's and the rater's block activations in the backward passes:
    # less memory, about one more forward per step; needs an optimizer that differentiates by
    # reverse mode only (unrolled reverse, or hvp: double_backward)
    activation_checkpointing: bool = False
    # the engines differentiate each inner and validation batch in this many parts, one at a
    # time: the same meta-gradient with the per-batch activation memory divided about by it
    # (engines that keep one step's graph at a time: unrolled mixed, implicit, one_step)
    chunks: int = Field(default=1, ge=1)
    # attention on the meta-gradient paths: 'math' (PyTorch's math kernel, every attention
    # matrix kept for the derivatives) or 'blocked' (meta.attention_block queries at a time,
    # recomputed in every derivative: the same meta-gradient, no attention matrix kept)
    attention: Literal["math", "blocked"] = "math"
    attention_block: int = Field(default=64, ge=1)
    # the backbone's and the rater's passes on the meta-gradient paths under bf16 autocast
    # (theta, eta, the inner optimizer state and the losses stay float32); needs
    # meta.attention: blocked, and an inner optimizer other than adamw_fresh
    precision: Literal["fp32", "bf16"] = "fp32"
    pretrained: str | None = None  # diffusion checkpoint (run or step folder); protocol fills it
    outer_steps: int = Field(default=2000, ge=0)
    inner_steps: int = Field(default=5, ge=1)  # S
    group_size: int = Field(default=8, ge=2)  # K candidate noises per (x0, y, t)
    groups: int = Field(default=32, gt=0)  # B groups per inner batch (global)
    # The global batch is split into this many independent inner loops (data-parallel
    # meta-learning); their meta-gradients are averaged. Each process runs
    # subproblems / nproc of them, so a set value gives the same rater on any number of
    # processes. Unset (null): one per process.
    subproblems: int | None = Field(default=None, gt=0)
    val_batch_size: int = Field(default=64, gt=0)
    val_fraction: float = Field(default=0.1, gt=0, lt=1)  # held out of the training set
    # Algorithm 1's "optimizer D", unrolled S steps from theta: see INNER_OPTIMIZERS
    inner_optimizer: InnerOptimizerName = "sgd"
    # Unset values are filled from train.* (train.lr, train.weight_decay, train.betas,
    # train.adam_eps) when the recipe is loaded, so `recipe show` prints what is used.
    inner_lr: float | None = Field(default=None, gt=0)
    inner_weight_decay: float | None = Field(default=None, ge=0)
    inner_betas: tuple[float, float] | None = None  # adamw_* only
    inner_eps: float | None = Field(default=None, ge=0)  # adamw_* only
    inner_eps_root: float = Field(default=1e-16, gt=0)  # adamw_*: d sqrt(v)/dv guard at v=0
    inner_momentum: float = Field(default=0.0, ge=0, lt=1)  # sgd only (heavy ball, fresh buffer)
    reset_theta: bool = True  # back to the checkpoint every outer step, else carry theta on
    rater_lr: float = Field(default=1e-4, gt=0)
    rater_weight_decay: float = Field(default=0.0, ge=0)
    rater_grad_clip: float | None = Field(default=None, gt=0)
    log_every: int = Field(default=10, gt=0)
    # groups per inner step of the fixed probe problem on which, every log_every steps, the
    # engine's meta-gradient is compared with the one-step (Theorem 4.2) one; 0: off
    probe_groups: int = Field(default=16, ge=0)
    ckpt_every: int = Field(default=100, gt=0)

    def fill_inner_defaults(self, train: TrainConfig) -> None:
        """Unset inner-optimizer values take the diffusion trainer's (``train.*``)."""
        if self.inner_lr is None:
            self.inner_lr = train.lr
        if self.inner_weight_decay is None:
            self.inner_weight_decay = train.weight_decay
        if self.inner_betas is None:
            self.inner_betas = train.betas
        if self.inner_eps is None:
            self.inner_eps = train.adam_eps

    def inner_spec(self) -> tuple[str, float, dict[str, Any]]:
        """``(engine optimizer name, lr, options)`` for :func:`noisevalue.meta.make_problem`."""
        assert self.inner_lr is not None and self.inner_betas is not None
        if self.inner_optimizer == "sgd":
            return "sgd", self.inner_lr, {"weight_decay": self.inner_weight_decay, "momentum": self.inner_momentum}
        return "adamw", self.inner_lr, {
            "weight_decay": self.inner_weight_decay, "betas": tuple(self.inner_betas),
            "eps": self.inner_eps, "eps_root": self.inner_eps_root,
        }


class SelectConfig(_Strict):
    """Stage (iii): continue diffusion training from the stage-(i) checkpoint per method."""

    steps: int = Field(default=80000, gt=0)  # continuation steps
    eval_every: int | None = Field(default=20000, gt=0)
    methods: dict[str, Component] = Field(
        default_factory=lambda: {
            "vanilla": Component(name="random", params={"k": 1}),
            "rater": Component(name="rater", params={"k": 4}),
            "max_norm": Component(name="max_norm", params={"k": 4}),
            "min_norm": Component(name="min_norm", params={"k": 4}),
        }
    )
    # Seeds of everything after the shared stage-(i) checkpoint (rater meta-training and
    # continuations). Default: the recipe's seed. With several, tables give mean and 95% CI.
    seeds: list[int] | None = Field(default=None, min_length=1)


AblationInput = Literal["timestep", "image", "label"]
ABLATION_INPUTS: tuple[AblationInput, ...] = ("timestep", "image", "label")


def _paper_ablation_variants() -> list[list[AblationInput]]:
    """Table 2's rows: w/o timestep, w/o image, w/o image and label, noise only."""
    return [["timestep"], ["image"], ["image", "label"], ["timestep", "image", "label"]]


class AblateConfig(_Strict):
    """``noisevalue ablate``: raters with inputs removed (paper Table 2), each trained on the
    stage-(i) checkpoint and used for a stage-(iii) continuation beside the full rater."""

    # each variant is the set of rater inputs it removes; the full rater is always the reference
    variants: list[list[AblationInput]] = Field(default_factory=_paper_ablation_variants)
    # the continuations' selector: one that declares needs_rater = "trained" (its k is the
    # number of candidates); each row gets its own variant's rater, for its seed
    selector: Component = Field(default_factory=lambda: Component(name="rater", params={"k": 4}))

    @model_validator(mode="after")
    def _distinct(self) -> AblateConfig:
        seen = [frozenset(v) for v in self.variants]
        if any(not v for v in seen):
            raise ValueError("a variant must remove at least one input (the full rater is always run)")
        if len(set(seen)) != len(seen):
            raise ValueError("the same variant is listed twice")
        return self


class TransferConfig(_Strict):
    """``noisevalue transfer`` (paper Table 4, appendix B.4): a frozen rater applied to the
    continuation of larger backbones, each from its loss-matched checkpoint."""

    targets: list[Component] = Field(
        default_factory=lambda: [Component(name="DiT-B/2"), Component(name="DiT-L/2")]
    )
    pretrain_steps: int | None = Field(default=None, gt=0)  # per target; default train.steps
    smoothing_window: int = Field(default=500, gt=0)  # centred rolling mean, in logged points
    stability_window: int = Field(default=1000, ge=0)  # W, in logged points
    # the selector of the continuations with the frozen rater (needs_rater = "trained")
    selector: Component = Field(default_factory=lambda: Component(name="rater", params={"k": 2}))


class AnalyzeConfig(_Strict):
    """``noisevalue analyze`` (paper section 5.3): what a rater learns at each training stage."""

    steps: list[int] | None = None  # pretrain checkpoints to probe (0: the initial weights)
    outer_steps: int = Field(default=500, gt=0)  # rater meta-training per checkpoint
    num_images: int = Field(default=2000, gt=0)
    candidates: int = Field(default=16, ge=2)
    timesteps: list[float] = Field(default_factory=lambda: [i / 10 for i in range(11)])
    # `analyze --signal`: held-out groups of `candidates` noises scored against the oracle,
    # and (t, noise) draws per image of the held-out half that defines L_val
    signal_groups: int = Field(default=512, gt=0)
    signal_val_draws: int = Field(default=8, gt=0)

    @model_validator(mode="after")
    def _unit_interval(self) -> AnalyzeConfig:
        if any(not 0.0 <= t <= 1.0 for t in self.timesteps):
            raise ValueError("timesteps are normalised: each must lie in [0, 1]")
        return self


class LadderOptimizer(_Strict):
    """An optimizer of ``noisevalue ladder``: ``sgd`` is plain SGD (no momentum, no weight
    decay: the meta inner loop's); ``adamw`` is the trainer's AdamW (``train.betas``,
    ``adam_eps``, ``weight_decay``) continued from the checkpoint's saved state, ``lr`` in
    place of the saved one."""

    name: Literal["sgd", "adamw"]
    lr: float = Field(gt=0)


def _ladder_optimizers() -> dict[str, LadderOptimizer]:
    return {
        "sgd-lr0.01": LadderOptimizer(name="sgd", lr=0.01),  # the meta inner loop's step
        "adamw-lr1e-3": LadderOptimizer(name="adamw", lr=1e-3),  # the digits trainer's
        "adamw-lr1e-4": LadderOptimizer(name="adamw", lr=1e-4),  # the paper's
    }


def _ladder_methods() -> dict[str, Component]:
    return {
        "vanilla": Component(name="random", params={"k": 1}),  # candidate 0 of every pool
        "oracle": Component(name="oracle", params={"k": 4}),
        "oracle_precond": Component(name="oracle_precond", params={"k": 4}),
        "rater": Component(name="rater", params={"k": 4}),
        "random_rater": Component(name="random_rater", params={"k": 4}),
        "min_norm": Component(name="min_norm", params={"k": 4}),
    }


_LABEL = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # a label that is also a folder name


class LadderConfig(_Strict):
    """``noisevalue ladder``: short continuations of the stage-(i) checkpoint per optimizer,
    selection method and seed, the held-out loss at each horizon (docs/ladder.md)."""

    seeds: list[int] = Field(default_factory=lambda: list(range(10)), min_length=2)
    horizons: list[int] = Field(default_factory=lambda: [1, 2, 5, 20, 80, 160], min_length=1)
    optimizers: dict[str, LadderOptimizer] = Field(default_factory=_ladder_optimizers, min_length=1)
    # selectors by label; "vanilla" (the reference of every difference) is required
    methods: dict[str, Component] = Field(default_factory=_ladder_methods)
    # more paired differences, method minus another method: by default the trained rater
    # against its untrained self (dropped when either is not among the methods)
    also_against: dict[str, str] = Field(default_factory=lambda: {"rater": "random_rater"})

    @model_validator(mode="after")
    def _consistent(self) -> LadderConfig:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {self.seeds} lists a seed twice")
        if any(h < 1 for h in self.horizons) or self.horizons != sorted(set(self.horizons)):
            raise ValueError(f"horizons: {self.horizons}: steps >= 1, increasing, each once")
        if "vanilla" not in self.methods:
            raise ValueError("methods: 'vanilla' is missing (the reference every method is compared with)")
        for what, labels in (("optimizers", self.optimizers), ("methods", self.methods)):
            bad = [label for label in labels if not re.match(_LABEL, label)]
            if bad:
                raise ValueError(f"{what}: label {bad[0]!r} is not a folder name (letters, digits, _ . -)")
        given = "also_against" in self.model_fields_set
        for method, other in list(self.also_against.items()):
            missing = next((label for label in (method, other) if label not in self.methods), None)
            if not given:
                if missing is not None:
                    del self.also_against[method]
            elif missing is not None:
                raise ValueError(f"also_against: '{missing}' is not one of the methods {sorted(self.methods)}")
            elif method == other:
                raise ValueError(f"also_against: '{method}' against itself")
        return self


class SampleConfig(_Strict):
    # ddim (eta below); ddpm: ancestral sampling over num_steps evenly spaced steps, with the
    # learned variance when the backbone has one (DiT's sampler), else the posterior's
    sampler: Literal["ddim", "ddpm"] = "ddim"
    num_steps: int = Field(default=50, gt=0)
    eta: float = Field(default=0.0, ge=0)
    cfg_scale: float = Field(default=1.0, ge=0)
    # Noise Awareness Guidance: w * (eps(x, t) - eps(x, null_t)); needs a backbone trained
    # with time_dropout_prob > 0 (e.g. the NAG-DiT backbones of noisevalue-nag)
    nag_scale: float = Field(default=0.0, ge=0)
    per_class: int = Field(default=8, gt=0)  # grid columns per class
    use_ema: bool = True
    batch_size: int = Field(default=256, gt=0)


class EvalConfig(_Strict):
    evaluators: list[Component] = Field(default_factory=list)
    num_samples: int = Field(default=1000, gt=0)
    # The held-out denoising loss (metric "heldout_loss", the primary one): the weights that
    # are sampled from, on a fixed, paired set shared by every run, method, seed and step:
    # up to loss_images reference images (data.eval_dataset) x loss_draws (t, noise) draws
    # from a fixed seed. 0 draws: off.
    loss_draws: int = Field(default=100, ge=0)
    loss_images: int = Field(default=10000, gt=0)
    every: int | None = Field(default=None, gt=0)  # also evaluate every N steps
    baselines: bool = False  # also score real training images and pixel-shuffled ones


TRACKERS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}  # backend -> (module, extra)
LogBackend = Literal["tensorboard", "wandb", "mlflow"]


def _default_backends() -> list[LogBackend]:
    return ["tensorboard"]


class LogConfig(_Strict):
    """Where a run's scalars, sample grids and resolved recipe go besides ``scalars.jsonl``:
    TensorBoard (``tb/``, the default), Weights & Biases, MLflow. Not result-relevant: a
    stage is reused whatever the trackers."""

    backends: list[LogBackend] = Field(default_factory=_default_backends)
    project: str = Field(default="noisevalue", min_length=1)  # the W&B project, the MLflow experiment
    # the runs of one protocol or experiment: W&B's group, an MLflow tag (default: its folder's name)
    group: str | None = None
    wandb_entity: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] | None = None  # None: W&B's own (WANDB_MODE)
    # None: MLFLOW_TRACKING_URI, else a SQLite store in the protocol's (or run's) folder
    mlflow_tracking_uri: str | None = None

    @field_validator("backends")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"a backend is named twice in {v}")
        return v


class Recipe(_Strict):
    name: str = Field(min_length=1)
    seed: int = 0
    output_dir: str = "runs/default"
    # pretrain: stage (i) only; meta_train: stage (ii); protocol: (i) -> (ii) -> (iii) + table
    workflow: Literal["pretrain", "meta_train", "protocol"] = "pretrain"
    data: DataConfig
    model: Component
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    rater: Component | None = None
    meta: MetaConfig = Field(default_factory=MetaConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    ablate: AblateConfig = Field(default_factory=AblateConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    analyze: AnalyzeConfig = Field(default_factory=AnalyzeConfig)
    ladder: LadderConfig = Field(default_factory=LadderConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    def continuation_seeds(self) -> list[int]:
        return list(dict.fromkeys(self.select.seeds or [self.seed]))

    @model_validator(mode="after")
    def _rater_needed(self) -> Recipe:
        if self.workflow in ("meta_train", "protocol") and self.rater is None:
            raise ValueError(f"workflow '{self.workflow}' needs a 'rater' section")
        self.meta.fill_inner_defaults(self.train)
        return self


def builtin_recipe_names() -> list[str]:
    files = resources.files(BUILTIN_RECIPES)
    return sorted(p.name[: -len(".yaml")] for p in files.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str | Path | None) -> tuple[Any, str]:
    from omegaconf import OmegaConf

    if source is None:
        source = DEFAULT_RECIPE
    path = Path(source)
    # a file of that name wins; a folder (a run's, say) does not hide a built-in recipe
    if not path.is_file() and str(source) in builtin_recipe_names():
        text = resources.files(BUILTIN_RECIPES).joinpath(f"{source}.yaml").read_text()
        label = f"<built-in recipe '{source}'>"
    elif path.is_file():
        text, label = path.read_text(), str(path)
    else:
        known = ", ".join(builtin_recipe_names())
        what = "a folder, not a recipe file" if path.is_dir() else "no such file"
        raise ConfigError(f"recipe '{source}': {what} (a YAML file, or a built-in recipe: {known})")
    try:
        cfg = OmegaConf.create(text)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{label}: not valid YAML: {first}") from exc
    if not isinstance(cfg, dict) and not OmegaConf.is_dict(cfg):
        raise ConfigError(f"{label}: a recipe must be a YAML mapping")
    return cfg, label


def _apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    from omegaconf import OmegaConf

    sets: list[str] = []
    for item in overrides:
        if item.startswith("~"):
            key = item[1:]
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if node is None or leaf not in node:
                raise ConfigError(f"override '{item}': '{key}' is not in the recipe")
            del node[leaf]
        elif "=" in item:
            if not item.partition("=")[0].strip():
                raise ConfigError(f"override '{item}': the key before '=' is empty; expected key=value")
            sets.append(item)
        else:
            raise ConfigError(f"override '{item}': expected key=value or ~key")
    for item in sets:  # in order; a list item by its index: eval.evaluators.0.params.x=1
        key, _, text = item.partition("=")
        try:
            parsed: Any = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]), resolve=False)
            OmegaConf.update(cfg, key.strip(), parsed["value"], merge=True)
        except Exception as exc:
            raise ConfigError(f"override '{item}': {str(exc).splitlines()[0]}") from exc
    return cfg


def _format_validation_error(exc: ValidationError, label: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (misspelled?)"
    elif err["type"] == "missing":
        msg = "required field is missing"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{label}: {loc}: {msg}{more}"


def load_recipe_dict(source: str | Path | None, overrides: list[str] | None = None) -> dict:
    """The recipe as a plain dict, overrides applied and interpolations resolved."""
    from omegaconf import OmegaConf

    cfg, label = _read_yaml(source)
    cfg = _apply_overrides(cfg, list(overrides or []))
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:
        raise ConfigError(f"{label}: {str(exc).splitlines()[0]}") from exc
    assert isinstance(data, dict)
    return data


def parse_recipe(data: dict, label: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, label)) from None


def load_recipe(source: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load, override, resolve and validate a recipe (file path or built-in name)."""
    label = str(source) if source is not None else f"<built-in recipe '{DEFAULT_RECIPE}'>"
    return parse_recipe(load_recipe_dict(source, overrides), label)


def component_slots(recipe: Recipe) -> list[tuple[str, str, Component]]:
    """(path in the recipe, registry kind, component) for every component it names."""
    slots = [
        ("data.dataset", "dataset", recipe.data.dataset),
        ("data.encoder", "encoder", recipe.data.encoder),
        ("model", "backbone", recipe.model),
    ]
    if recipe.data.eval_dataset is not None:
        slots.append(("data.eval_dataset", "dataset", recipe.data.eval_dataset))
    for i, ev in enumerate(recipe.eval.evaluators):
        slots.append((f"eval.evaluators.{i}", "evaluator", ev))
    slots.append(("train.selector", "selector", recipe.train.selector))
    slots.append(("train.loss_weighting", "loss_weighting", recipe.train.loss_weighting))
    slots.append(("train.timestep_sampler", "timestep_sampler", recipe.train.timestep_sampler))
    for i, target in enumerate(recipe.transfer.targets):
        slots.append((f"transfer.targets.{i}", "backbone", target))
    if recipe.rater is not None:
        slots.append(("rater", "rater", recipe.rater))
        slots.append(("meta.optimizer", "meta_optimizer", recipe.meta.optimizer))
    if recipe.workflow == "protocol":
        for label, comp in recipe.select.methods.items():
            slots.append((f"select.methods.{label}", method_kind(f"select.methods.{label}", comp), comp))
    slots.append(("ablate.selector", "selector", recipe.ablate.selector))
    slots.append(("transfer.selector", "selector", recipe.transfer.selector))
    return slots


def check_nag(recipe: Recipe) -> None:
    """``sample.nag_scale`` > 0 needs a backbone that learns a null time."""
    import inspect

    from noisevalue import registry

    if recipe.sample.nag_scale == 0:
        return
    factory = registry.get("backbone", recipe.model.name)
    param = inspect.signature(factory).parameters.get("time_dropout_prob")
    value = recipe.model.params.get("time_dropout_prob", None if param is None else param.default)
    if not isinstance(value, int | float) or value <= 0:
        raise ConfigError(
            f"sample.nag_scale: Noise Awareness Guidance ({recipe.sample.nag_scale:g}) needs a backbone trained "
            f"with time_dropout_prob > 0, and '{recipe.model.name}' has none; use a NAG backbone "
            "(noisevalue-nag: NAG-DiT-S/2, ...) or sample.nag_scale=0"
        )


#: the kinds a training-side method (``select.methods``, ``noisevalue compare --method``) is
#: looked up in: a continuation changes how noise is chosen, how the loss is weighted, or
#: how timesteps are drawn
METHOD_KINDS = ("selector", "loss_weighting", "timestep_sampler")


def method_kind(where: str, comp: Component) -> str:
    """The registry kind of a training-side method, found by its name in :data:`METHOD_KINDS`."""
    from noisevalue import registry

    found = [kind for kind in METHOD_KINDS if comp.name in registry.names(kind)]
    if len(found) == 1:
        return found[0]
    key = where if where.startswith("--") else f"{where}.name"
    if found:
        kinds = " and a ".join(k.replace("_", " ") for k in found)
        raise ConfigError(f"{key}: '{comp.name}' is both a {kinds}; as a method it is ambiguous")
    known = "; ".join(f"{kind.replace('_', ' ')}s: {', '.join(registry.names(kind))}" for kind in METHOD_KINDS)
    raise ConfigError(f"{key}: unknown method '{comp.name}' ({known})")


def check_has_rater(where: str, comp: Component) -> None:
    """A selector that declares it needs a rater gets one from its ``checkpoint`` where
    nothing hands it one (``train.selector``; ``select.methods`` are handed theirs)."""
    from noisevalue import registry
    from noisevalue.interfaces import rater_need

    need = rater_need(registry.resolve("selector", comp, where))
    if need is not None and "checkpoint" not in comp.params:
        raise ConfigError(
            f"{where}.params.checkpoint: selector '{comp.name}' needs a{'n untrained' if need == 'untrained' else ' trained'}"
            f" rater; give a rater checkpoint (run or step folder), or list the selector under select.methods, "
            "where the protocol hands it its seed's rater"
        )


def check_takes_trained_rater(where: str, comp: Component) -> None:
    """``ablate.selector`` and ``transfer.selector`` are handed a rater per row: they must
    declare ``needs_rater = "trained"`` and name no checkpoint of their own."""
    from noisevalue import registry
    from noisevalue.interfaces import rater_need

    if rater_need(registry.resolve("selector", comp, where)) != "trained":
        raise ConfigError(
            f"{where}.name: selector '{comp.name}' does not declare needs_rater = \"trained\"; "
            "expected a selector that takes the meta-trained rater (e.g. rater)"
        )
    if "checkpoint" in comp.params:
        raise ConfigError(f"{where}.params.checkpoint: leave it out; each row gets its own rater")


def check_components(recipe: Recipe) -> None:
    """Every named component exists and accepts the given parameters; an inner optimizer
    that resumes the checkpoint's AdamW finds its state there."""
    from noisevalue import registry

    for where, kind, comp in component_slots(recipe):
        registry.resolve(kind, comp, where)
        trial_build(where, kind, comp)
    check_has_rater("train.selector", recipe.train.selector)
    check_takes_trained_rater("ablate.selector", recipe.ablate.selector)
    check_takes_trained_rater("transfer.selector", recipe.transfer.selector)
    check_nag(recipe)
    check_trackers(recipe)
    m = recipe.meta
    if m.activation_checkpointing and recipe.workflow in ("meta_train", "protocol"):
        optimizer = registry.build("meta_optimizer", m.optimizer, where="meta.optimizer")
        if not optimizer.supports_checkpointing:
            raise ConfigError(
                f"meta.activation_checkpointing: meta.optimizer '{m.optimizer.name}' "
                f"{dict(m.optimizer.params) or ''} uses forward-mode AD, which cannot run through "
                "recomputed activations; set meta.optimizer.params.hvp=double_backward (or mode=reverse)"
            )
    if m.precision == "bf16" and m.attention != "blocked":
        raise ConfigError(
            "meta.precision: bf16 needs meta.attention: blocked (PyTorch's math attention kernel "
            "fails under bf16 autocast inside torch.func transforms)"
        )
    if m.precision == "bf16" and m.inner_optimizer == "adamw_fresh":
        raise ConfigError(
            "meta.precision: bf16 with meta.inner_optimizer: adamw_fresh gives meta-gradients that "
            "differ from fp32 by 50-80% (Adam's first steps from zero moments amplify round-off); "
            "use fp32, sgd or adamw_checkpoint"
        )
    if recipe.workflow == "meta_train" and m.pretrained and m.inner_optimizer == "adamw_checkpoint":
        from noisevalue import checkpoint

        path = checkpoint.resolve_checkpoint(m.pretrained)
        checkpoint.require_optimizer_state(path, "meta.inner_optimizer: adamw_checkpoint")


def check_trackers(recipe: Recipe) -> None:
    """Every tracker of ``log.backends`` is installed (found, not imported)."""
    from importlib.util import find_spec

    for backend in recipe.log.backends:
        module, extra = TRACKERS.get(backend, (None, None))
        if module is not None and find_spec(module) is None:
            raise ConfigError(f"log.backends: '{backend}' needs the {module} package, which is not installed; "
                              f"pip install 'noisevalue[{extra}]', or remove it from log.backends")


def trial_build(where: str, kind: str, comp: Component) -> None:
    """Build a component that declares ``cheap_to_build`` once with its recipe parameters,
    so a constructor's ValueError/TypeError is one line naming ``where`` before any
    training. Backbones and raters are built on the meta device (no weights allocated; shape
    keywords take their defaults). A selector that needs a rater and has no checkpoint yet (the protocol fills
    it) gets a stand-in module; one with a checkpoint is left for the run to load."""
    from torch import nn

    from noisevalue import registry
    from noisevalue.interfaces import (
        LossWeighting,
        MetaOptimizer,
        NoiseSelector,
        Rater,
        TimestepSampler,
        rater_need,
    )

    factory = registry.get(kind, comp.name)
    if kind in ("backbone", "rater"):  # networks: built on the meta device, so no memory is used
        registry.build_on_meta(kind, comp, where=where)
        return
    if not (isinstance(factory, type) and issubclass(factory, (LossWeighting, MetaOptimizer, NoiseSelector, Rater, TimestepSampler))):
        return  # a plain function factory declares nothing
    if not factory.cheap_to_build:
        return
    if rater_need(factory) is not None:
        if "checkpoint" not in comp.params:
            registry.build(kind, comp, where=where, rater=nn.Module())
        return
    registry.build(kind, comp, where=where)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``dotted`` = ``"a.b"`` in a recipe's dict form,
    creating missing sections."""
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[leaf] = value
