"""Stage (ii): bilevel meta-training of a noise rater on a frozen diffusion checkpoint.

Each outer step draws S grouped inner batches (B groups of K candidate noises sharing x0,
label and t) from the training part of the data and one validation batch from a held-out
split of it; the configured MetaOptimizer returns the rater's meta-gradient; the rater's
own optimizer applies it. theta starts from the checkpoint every outer step (default) or is
carried along. All draws are seeded per (seed, outer step, inner step), so resume is exact.

The inner optimizer (``meta.inner_optimizer``) is plain SGD, AdamW from zero moments, or the
diffusion trainer's own AdamW resumed from the moments and step count saved with the
checkpoint (``adamw_checkpoint``). With ``reset_theta: false`` the optimizer state is
carried along with theta.

Every ``meta.log_every`` steps the meta-signal is measured on a fixed probe problem: the
cosine between the engine's meta-gradient and the one-step gradient-alignment one
(Theorem 4.2), and both norms (TensorBoard ``signal/*``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from noisevalue import checkpoint as ckpt
from noisevalue import registry
from noisevalue.config import Recipe
from noisevalue.diffusion import Diffusion
from noisevalue.distributed import DistInfo, all_reduce_mean, barrier
from noisevalue.errors import CheckpointError, ConfigError
from noisevalue.interfaces import BilevelProblem, Params
from noisevalue.meta.one_step import OneStep
from noisevalue.meta.problem import GroupedBatch, PlainBatch, group_stats, make_problem, param_dict
from noisevalue.raters import RATER_GROUP
from noisevalue.train.batches import (
    STREAM_META,
    STREAM_PROBE,
    STREAM_VAL,
    GlobalOrder,
    draw_conditions,
    draw_noise,
    to_device,
    validation_split,
)
from noisevalue.train.build import checkpoint_backbone
from noisevalue.train.data import load_train_data
from noisevalue.train.progress import StepProgress
from noisevalue.train.trainer import Trainer


def subproblems(recipe: Recipe, world_size: int) -> int:
    """``meta.subproblems``, or one inner loop per process when unset."""
    return recipe.meta.subproblems or world_size


def same_subproblems(meta: ckpt.CheckpointMeta, now: int) -> None:
    """A resumed meta-training keeps the number of inner loops its checkpoints were made with."""
    saved = (meta.meta or {}).get("subproblems")
    if saved is not None and saved != now:
        raise ConfigError(
            f"meta.subproblems: this run used {saved} inner loops and would now use {now} "
            f"(one per process when unset); resume with the same process count or set meta.subproblems={saved}"
        )


def local_subproblems(total: int, world_size: int) -> int:
    if total % world_size:
        raise ConfigError(f"meta.subproblems: {total} is not divisible by the {world_size} processes")
    return total // world_size


def per_subproblem(size: int, subproblems: int, field: str) -> int:
    if size % subproblems:
        raise ConfigError(f"{field}: {size} is not divisible by meta.subproblems ({subproblems})")
    return size // subproblems


INNER_STATE = "inner_state"  # tensor group of the carried inner-optimizer state


def checkpoint_adam_state(path: Path, names: list[str]) -> tuple[dict[str, Params], int]:
    """The AdamW moments (``{"m": ..., "v": ...}`` keyed by parameter name) and step count
    saved with a diffusion checkpoint, for the trainable parameters ``names`` (in the order
    the trainer built its optimizer from)."""
    where = "meta.inner_optimizer: adamw_checkpoint"
    meta = ckpt.require_optimizer_state(path, where)
    assert meta.optimizer is not None
    state = ckpt.optimizer_from_flat(ckpt.load_tensors(path, "optimizer"), meta.optimizer)
    groups = state["param_groups"]
    order = [i for g in groups for i in g["params"]]
    if len(order) != len(names):
        raise CheckpointError(
            f"{where}: the optimizer state in '{path}' covers {len(order)} parameters, the "
            f"backbone has {len(names)} trainable ones"
        )
    m: Params = {}
    v: Params = {}
    steps = set()
    for idx, name in zip(order, names, strict=True):
        entry = state["state"].get(idx)
        if entry is None or "exp_avg" not in entry:
            raise CheckpointError(f"{where}: '{path}' has no AdamW moments for parameter '{name}'")
        m[name], v[name] = entry["exp_avg"], entry["exp_avg_sq"]
        steps.add(int(float(entry["step"])))
    if len(steps) != 1:
        raise CheckpointError(f"{where}: '{path}' holds different step counts {sorted(steps)}")
    return {"m": m, "v": v}, steps.pop()


def cosine(a: Params, b: Params) -> tuple[float, float, float]:
    """(cosine, |a|, |b|) of two parameter dicts, in float64."""
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    na = math.sqrt(sum(float(a[k].double().pow(2).sum()) for k in a))
    nb = math.sqrt(sum(float(b[k].double().pow(2).sum()) for k in b))
    return (dot / (na * nb) if na > 0 and nb > 0 else math.nan), na, nb


class RaterMetaTraining(Trainer):
    def __init__(self, recipe: Recipe, run_dir: str | Path, info: DistInfo, resume: bool = False):
        super().__init__(recipe, run_dir, info, resume)
        self.theta: dict[str, torch.Tensor] | None = None  # carried theta (reset_theta false)
        self.inner_state: dict[str, Params] | None = None  # the inner optimizer's starting state
        self.inner_step = 0  # and its step count
        self._draws: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}  # this outer step's
        self._probe_batches: dict[int, tuple[list[GroupedBatch], PlainBatch]] = {}  # per sub-problem

    def setup(self) -> None:
        r, info, m = self.recipe, self.info, self.recipe.meta
        assert r.rater is not None
        self.set_threads()
        if not m.pretrained:
            raise ConfigError("meta.pretrained: a diffusion checkpoint (run or step folder) is required")
        self.data, _ = load_train_data(r, self.run_dir, info)
        self.latent_shape, self.num_classes = self.data.latent_shape, self.data.num_classes
        self.subproblems = subproblems(r, info.world_size)
        self.local_subproblems = local_subproblems(self.subproblems, info.world_size)
        self.groups = per_subproblem(m.groups, self.subproblems, "meta.groups")
        self.val_batch = per_subproblem(m.val_batch_size, self.subproblems, "meta.val_batch_size")
        if m.probe_groups:
            per_subproblem(m.probe_groups, self.subproblems, "meta.probe_groups")
        self.train_idx, self.val_idx = validation_split(self.data.num_items, m.val_fraction, r.seed)

        path = ckpt.resolve_checkpoint(m.pretrained)
        meta = ckpt.require_diffusion(path, "meta.pretrained")
        assert meta.backbone is not None
        if meta.latent_shape != tuple(self.latent_shape) or meta.num_classes != self.num_classes:
            raise CheckpointError(
                f"checkpoint '{path}' was trained on latents {meta.latent_shape} with "
                f"{meta.num_classes} classes, but the data gives {tuple(self.latent_shape)} "
                f"with {self.num_classes}"
            )
        backbone = checkpoint_backbone(path, meta.backbone, "model", "meta.pretrained", str(path))
        self.backbone = backbone.to(info.device)  # its parameters are only read, via theta
        self.pretrained = path
        self.drop_prob = float(backbone.class_dropout_prob) if self.num_classes else 0.0

        self.rater_params = registry.with_shapes("rater", r.rater, "rater", self.latent_shape, self.num_classes)
        torch.manual_seed(r.seed + 1)  # identical rater init on every rank
        self.rater = registry.build("rater", registry.Named(r.rater.name, self.rater_params), where="rater").to(info.device)
        # recompute block activations in the backward passes (engines check they can)
        self.backbone.gradient_checkpointing = self.rater.gradient_checkpointing = m.activation_checkpointing
        self.rater_opt = torch.optim.AdamW(
            [p for p in self.rater.parameters() if p.requires_grad],
            lr=m.rater_lr, weight_decay=m.rater_weight_decay,
        )
        self.meta_opt = registry.build("meta_optimizer", m.optimizer, where="meta.optimizer")
        self.diffusion = Diffusion.from_config(r.diffusion)
        self.theta0 = param_dict(self.backbone)
        if m.inner_optimizer == "adamw_checkpoint":
            self.inner_state, self.inner_step = checkpoint_adam_state(path, list(self.theta0))
            self.inner_state = {p: {k: v.to(info.device) for k, v in t.items()} for p, t in self.inner_state.items()}
        self.train_order = GlobalOrder(len(self.train_idx), r.seed)
        self.val_order = GlobalOrder(len(self.val_idx), r.seed + 1)
        if self.resume:
            self._restore()
        self.open_log()

    # ------------------------------------------------------------------ batches
    def _batch(self, order: GlobalOrder, pool: torch.Tensor, key: int, size: int, k: int, stream: int, part: int):
        """Sub-problem ``part``'s slice (``size`` items) of the global batch ``key`` (of
        ``meta.subproblems`` slices): items, timesteps, drops and flips are drawn for the
        global batch once, the noise for this slice's rows only."""
        r, dev = self.recipe, self.info.device
        global_size = size * self.subproblems
        if (stream, key) not in self._draws:  # drawn once, sliced by each local sub-problem
            conditions = draw_conditions(r.seed, key, global_size, self.diffusion.num_timesteps, self.drop_prob,
                                         r.data.random_flip, stream)
            self._draws[stream, key] = (pool[order.batch(key, global_size)], *conditions)
        idx, t, drop, flip = self._draws[stream, key]
        lo, hi = part * size, (part + 1) * size
        x0, y = self.data.fetch(idx[lo:hi], flip[lo:hi])
        y_in = None
        if self.num_classes:
            y_in = to_device(torch.where(drop[lo:hi], torch.full_like(y, self.num_classes), y), dev)
        noise = draw_noise(r.seed, key, lo, hi, self.latent_shape, k, stream)
        return to_device(x0, dev), y_in, to_device(t[lo:hi], dev), to_device(noise, dev)

    def inner_batches(self, outer: int, part: int) -> list[GroupedBatch]:
        m = self.recipe.meta
        out = []
        for s in range(m.inner_steps):
            x0, y, t, noise = self._batch(self.train_order, self.train_idx, outer * m.inner_steps + s,
                                          self.groups, m.group_size, STREAM_META, part)
            out.append(GroupedBatch(x0, y, t, noise))
        return out

    def validation_batch(self, outer: int, part: int) -> PlainBatch:
        x0, y, t, noise = self._batch(self.val_order, self.val_idx, outer, self.val_batch, 1, STREAM_VAL, part)
        return PlainBatch(x0, y, t, noise[:, 0])

    def problem(self, inner: list[GroupedBatch], val: PlainBatch) -> BilevelProblem:
        m = self.recipe.meta
        name, lr, options = m.inner_spec()
        return make_problem(
            self.backbone, self.rater, self.diffusion, inner, val, inner_optimizer=name, inner_lr=lr,
            inner_options=options, inner_state=self.inner_state, inner_step=self.inner_step, chunks=m.chunks,
            attention_block=m.attention_block if m.attention == "blocked" else None, precision=m.precision,
        )

    def probe_problem(self, part: int) -> BilevelProblem:
        """Sub-problem ``part`` of the fixed probe: S grouped batches of ``meta.probe_groups``
        groups and one validation batch, cut into ``meta.subproblems`` parts as the outer
        step's batches are, and drawn from their own stream (the same at every log)."""
        m = self.recipe.meta
        if part not in self._probe_batches:
            draws, self._draws = self._draws, {}
            groups = m.probe_groups // self.subproblems
            inner = []
            for s in range(m.inner_steps):
                x0, y, t, noise = self._batch(self.train_order, self.train_idx, s, groups, m.group_size,
                                              STREAM_PROBE, part)
                inner.append(GroupedBatch(x0, y, t, noise))
            x0, y, t, noise = self._batch(self.val_order, self.val_idx, m.inner_steps, self.val_batch, 1,
                                          STREAM_PROBE, part)
            self._probe_batches[part] = (inner, PlainBatch(x0, y, t, noise[:, 0]))
            self._draws = draws
        return self.problem(*self._probe_batches[part])

    def signal(self, theta: Params, eta: Params) -> dict[str, float]:
        """The engine's meta-gradient against the one-step gradient-alignment one (Theorem
        4.2) on the probe problem: their cosine and norms. Every process computes its
        sub-problems, so no process waits for the probe; both meta-gradients are averaged
        over the sub-problems, as the outer step's is."""
        n, info = self.local_subproblems, self.info
        engine: Params = {}
        one_step: Params = {}
        for j in range(n):
            problem = self.probe_problem(info.rank * n + j)
            hvp = "double_backward" if problem.checkpointed else "jvp"
            for total, grad in ((engine, self.meta_opt.meta_gradient(problem, theta, eta).grad),
                                (one_step, OneStep(hvp=hvp).meta_gradient(problem, theta, eta).grad)):
                for key, g in grad.items():
                    total[key] = total[key] + g / n if key in total else g / n
        engine = {k: all_reduce_mean(v.clone(), info) for k, v in engine.items()}
        one_step = {k: all_reduce_mean(v.clone(), info) for k, v in one_step.items()}
        cos, n_engine, n_one = cosine(engine, one_step)
        return {"signal/cosine_one_step": cos, "signal/meta_grad_norm": n_engine,
                "signal/one_step_grad_norm": n_one}

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        m = self.recipe.meta
        if m.outer_steps == 0 and self.newest_step() is None:
            self.save_checkpoint()  # the untrained rater (a control), as a checkpoint
        with StepProgress("meta-train rater", m.outer_steps, self.step, enabled=self.info.is_main, print_every=m.log_every * 2) as bar:
            while self.step < m.outer_steps:
                log = (self.step + 1) % m.log_every == 0 or self.step + 1 == m.outer_steps
                probe = None
                if log and m.probe_groups:  # before the update: same eta; every process its share
                    probe = self.signal(self.current_theta(), param_dict(self.rater))
                stats = self.outer_step(self.step)
                self.step += 1
                bar.advance(val_loss=stats.get("meta/val_loss", math.nan))
                if log:
                    self.log_scalars({**stats, **(probe or {})})
                if self.step % m.ckpt_every == 0 or self.step == m.outer_steps:
                    self.save_checkpoint()

    def current_theta(self) -> Params:
        return self.theta0 if (self.recipe.meta.reset_theta or self.theta is None) else self.theta

    def outer_step(self, outer: int) -> dict[str, float]:
        m, info = self.recipe.meta, self.info
        self._draws.clear()
        theta = self.current_theta()
        eta = param_dict(self.rater)
        n = self.local_subproblems
        grads: dict[str, torch.Tensor] = {}
        thetas: dict[str, torch.Tensor] = {}
        states: dict[str, Params] = {}
        outer_loss, infos, finite = 0.0, {}, True
        for j in range(n):
            part = info.rank * n + j
            batches = self.inner_batches(outer, part)
            problem = self.problem(batches, self.validation_batch(outer, part))
            result = self.meta_opt.meta_gradient(problem, theta, eta)
            finite &= all(bool(torch.isfinite(g).all()) for g in result.grad.values())
            finite &= math.isfinite(result.outer_loss)
            for key, g in result.grad.items():
                grads[key] = grads[key] + g / n if key in grads else g / n
            if not m.reset_theta:
                for key, v in result.theta.items():
                    thetas[key] = thetas[key] + v.detach() / n if key in thetas else v.detach() / n
                if self.inner_state is not None and result.inner_state is not None:
                    for part_name, tree in result.inner_state.items():
                        acc = states.setdefault(part_name, {})
                        for key, v in tree.items():
                            acc[key] = acc[key] + v.detach() / n if key in acc else v.detach() / n
            outer_loss += result.outer_loss / n
            infos = result.info
        flag = torch.tensor([0.0 if finite else 1.0], device=info.device)
        if float(all_reduce_mean(flag, info)) > 0:  # on any process: every process skips or stops alike
            self.skip_or_stop(outer, "meta-gradient became NaN/inf at outer step", "rater weights",
                              "Lower meta.rater_lr or meta.inner_lr, set meta.rater_grad_clip, or use "
                              "train.nonfinite=skip")
            return {"meta/skipped_steps": float(self.skipped)}  # skipped: no rater update, nothing carried
        for name, p in self.rater.named_parameters():
            if p.requires_grad:
                p.grad = all_reduce_mean(grads[name].to(p.dtype).clone(), info)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.rater.parameters(), m.rater_grad_clip if m.rater_grad_clip else float("inf")
        )
        self.rater_opt.step()
        if not m.reset_theta:  # carry theta (and a resumed optimizer's state) to the next step
            self.theta = {k: all_reduce_mean(v.clone(), info) for k, v in thetas.items()}
            if states:
                self.inner_state = {p: {k: all_reduce_mean(v.clone(), info) for k, v in t.items()}
                                    for p, t in states.items()}
                self.inner_step += m.inner_steps
        stats = {
            "meta/val_loss": float(all_reduce_mean(torch.tensor([outer_loss], device=info.device), info)),
            "meta/grad_norm": float(grad_norm),
        }
        stats.update({f"meta/{k}": v for k, v in group_stats(self.rater, param_dict(self.rater), batches[0]).items()})
        stats.update({f"meta/info/{k}": float(v) for k, v in infos.items()})
        return stats

    def _identity(self) -> ckpt.Identity:
        assert self.recipe.rater is not None
        return ckpt.Identity(name=self.recipe.rater.name, params=self.rater_params)

    def save_checkpoint(self) -> None:
        if self.info.is_main:
            opt_tensors, opt_meta = ckpt.optimizer_to_flat(self.rater_opt.state_dict())
            tensors = {RATER_GROUP: self.rater.state_dict(), "rater_optimizer": opt_tensors}
            if self.theta is not None:
                tensors["theta"] = self.theta
                if self.inner_state is not None:
                    tensors[INNER_STATE] = {f"{p}/{k}": v for p, t in self.inner_state.items() for k, v in t.items()}
            meta = ckpt.CheckpointMeta(
                step=self.step, rater=self._identity(), optimizer=opt_meta, latent_shape=self.latent_shape,
                num_classes=self.num_classes, pretrained=str(self.pretrained),
                meta={**self.recipe.meta.model_dump(mode="json"), "subproblems": self.subproblems},
                inner_step=self.inner_step, skipped=self.skipped,
            )
            ckpt.save_checkpoint(self.ckpt_dir, tensors, meta, *self.retention())
        barrier(self.info)

    def retention(self) -> tuple[int | None, int | None]:
        return self.recipe.train.keep_checkpoints, None  # keep_every marks the diffusion trajectory only

    def _restore(self) -> None:
        path = self.checkpoint_to_resume()
        meta = ckpt.read_meta(path)
        if meta.rater != self._identity():
            raise CheckpointError(
                f"checkpoint '{path}' holds rater {meta.rater}, but the recipe builds {self._identity()}"
            )
        same_subproblems(meta, self.subproblems)
        ckpt.load_state_into(self.rater, ckpt.load_tensors(path, RATER_GROUP, self.info.device), str(path))
        self.skipped = meta.skipped or 0
        flat = ckpt.load_tensors(path, "rater_optimizer")  # moments to the device, step counters on the host
        self.rater_opt.load_state_dict(ckpt.optimizer_from_flat(flat, meta.optimizer or {}))
        m = self.recipe.meta  # the recipe's settings, not the saved ones (a change accepted on resume)
        for group in self.rater_opt.param_groups:
            group.update(lr=m.rater_lr, weight_decay=m.rater_weight_decay)
        if (path / "theta.safetensors").is_file():
            self.theta = ckpt.load_tensors(path, "theta", self.info.device)
        if (path / f"{INNER_STATE}.safetensors").is_file():
            flat = ckpt.load_tensors(path, INNER_STATE, self.info.device)
            state: dict[str, Params] = {}
            for key, v in flat.items():
                part, name = key.split("/", 1)
                state.setdefault(part, {})[name] = v
            self.inner_state, self.inner_step = state, int(meta.inner_step or 0)
        self.step = meta.step
