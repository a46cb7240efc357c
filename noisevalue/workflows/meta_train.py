"""Stage (ii): bilevel meta-training of a noise rater on a frozen diffusion checkpoint.

Each outer step draws S grouped inner batches (B groups of K candidate noises sharing x0,
label and t) from the training part of the data and one validation batch from a held-out
split of it; the configured MetaOptimizer returns the rater's meta-gradient; the rater's
own optimizer applies it. theta starts from the checkpoint every outer step (default) or is
carried along. All draws are seeded per (seed, outer step, inner step), so resume is exact.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from noisevalue import checkpoint as ckpt
from noisevalue.config import Component, Recipe
from noisevalue.diffusion import Diffusion
from noisevalue.distributed import DistInfo, all_reduce_mean, barrier
from noisevalue.errors import CheckpointError, ConfigError, UserError
from noisevalue.meta.problem import GroupedBatch, PlainBatch, group_stats, make_problem, param_dict
from noisevalue.raters import RATER_GROUP
from noisevalue.workflows.batches import (
    STREAM_META,
    STREAM_SPLIT,
    STREAM_VAL,
    GlobalOrder,
    StepDraws,
    draw_step,
    seeded_generator,
)
from noisevalue.workflows.build import checkpoint_backbone, create, shape_params
from noisevalue.workflows.progress import StepProgress
from noisevalue.workflows.run_log import RunLog
from noisevalue.workflows.train_data import load_train_data


def local_subproblems(total: int, world_size: int) -> int:
    if total % world_size:
        raise ConfigError(f"meta.subproblems: {total} is not divisible by the {world_size} processes")
    return total // world_size


def per_subproblem(size: int, subproblems: int, field: str) -> int:
    if size % subproblems:
        raise ConfigError(f"{field}: {size} is not divisible by meta.subproblems ({subproblems})")
    return size // subproblems


def validation_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): a seeded random ``fraction`` of ``n`` held out."""
    n_val = int(round(n * fraction))
    if n_val < 1 or n_val >= n:
        raise ConfigError(
            f"meta.val_fraction: {fraction} of {n} training items leaves "
            f"{'no validation' if n_val < 1 else 'no training'} data"
        )
    perm = torch.randperm(n, generator=seeded_generator(seed, 0, STREAM_SPLIT))
    return perm[n_val:], perm[:n_val]


class RaterMetaTraining:
    def __init__(self, recipe: Recipe, run_dir: str | Path, info: DistInfo, resume: bool = False):
        self.recipe, self.info, self.resume = recipe, info, resume
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.log = RunLog()
        self.theta: dict[str, torch.Tensor] | None = None
        self._draws: dict[tuple[int, int], tuple[torch.Tensor, StepDraws]] = {}  # this outer step's

    def setup(self) -> None:
        r, info, m = self.recipe, self.info, self.recipe.meta
        assert r.rater is not None
        if r.train.threads and info.device.type == "cpu":
            torch.set_num_threads(r.train.threads)
        if not m.pretrained:
            raise ConfigError("meta.pretrained: a diffusion checkpoint (run or step folder) is required")
        self.data, _ = load_train_data(r, self.run_dir, info)
        self.latent_shape, self.num_classes = self.data.latent_shape, self.data.num_classes
        self.local_subproblems = local_subproblems(m.subproblems, info.world_size)
        self.groups = per_subproblem(m.groups, m.subproblems, "meta.groups")
        self.val_batch = per_subproblem(m.val_batch_size, m.subproblems, "meta.val_batch_size")
        self.train_idx, self.val_idx = validation_split(self.data.num_items, m.val_fraction, r.seed)

        path = ckpt.resolve_checkpoint(m.pretrained)
        meta = ckpt.read_meta(path)
        identity = meta.get("backbone") or {}
        if tuple(meta.get("latent_shape", ())) != tuple(self.latent_shape) or meta.get("num_classes") != self.num_classes:
            raise CheckpointError(
                f"checkpoint '{path}' was trained on latents {tuple(meta.get('latent_shape', ()))} with "
                f"{meta.get('num_classes')} classes, but the data gives {tuple(self.latent_shape)} "
                f"with {self.num_classes}"
            )
        backbone = checkpoint_backbone(path, identity, "model", "meta.pretrained", str(path))
        self.backbone = backbone.to(info.device)  # its parameters are only read, via theta
        self.pretrained = path
        self.drop_prob = float(getattr(backbone, "class_dropout_prob", 0.0)) if self.num_classes else 0.0

        self.rater_params = shape_params("rater", r.rater, "rater", self.latent_shape, self.num_classes)
        torch.manual_seed(r.seed + 1)  # identical rater init on every rank
        self.rater = create("rater", Component(name=r.rater.name, params=self.rater_params), "rater").to(info.device)
        self.rater_opt = torch.optim.AdamW(
            [p for p in self.rater.parameters() if p.requires_grad],
            lr=m.rater_lr, weight_decay=m.rater_weight_decay,
        )
        self.meta_opt = create("meta_optimizer", m.optimizer, "meta.optimizer")
        self.diffusion = Diffusion.from_config(r.diffusion)
        self.theta0 = param_dict(self.backbone)
        self.train_order = GlobalOrder(len(self.train_idx), r.seed)
        self.val_order = GlobalOrder(len(self.val_idx), r.seed + 1)
        if self.resume:
            self._restore()
        self.log = RunLog(self.run_dir, info.is_main, self.step)

    # ------------------------------------------------------------------ batches
    def _batch(self, order: GlobalOrder, pool: torch.Tensor, key: int, size: int, k: int, stream: int, part: int):
        """Sub-problem ``part``'s slice (``size`` items) of the global batch ``key``."""
        r, info = self.recipe, self.info
        global_size = size * r.meta.subproblems
        if (stream, key) not in self._draws:  # drawn once, sliced by each local sub-problem
            self._draws[stream, key] = (
                pool[order.batch(key, global_size)],
                draw_step(r.seed, key, global_size, self.latent_shape, self.diffusion.num_timesteps,
                          self.drop_prob, r.data.random_flip, k=k, stream=stream),
            )
        idx, draws = self._draws[stream, key]
        lo, hi = part * size, (part + 1) * size
        mine = draws.slice(lo, hi)
        x0, y = self.data.fetch(idx[lo:hi], mine.flip)
        dev = info.device
        y_in = None
        if self.num_classes:
            y_in = torch.where(mine.drop, torch.full_like(y, self.num_classes), y).to(dev)
        return x0.to(dev), y_in, mine.t.to(dev), mine.noise.to(dev)

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

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        m = self.recipe.meta
        with StepProgress("meta-train rater", m.outer_steps, self.step, enabled=self.info.is_main, print_every=m.log_every * 2) as bar:
            while self.step < m.outer_steps:
                stats = self.outer_step(self.step)
                self.step += 1
                bar.advance(val_loss=stats["meta/val_loss"])
                if self.step % m.log_every == 0 or self.step == m.outer_steps:
                    self.log_scalars(stats)
                if self.step % m.ckpt_every == 0 or self.step == m.outer_steps:
                    self.save_checkpoint()

    def outer_step(self, outer: int) -> dict[str, float]:
        m, info = self.recipe.meta, self.info
        self._draws.clear()
        theta = self.theta0 if (m.reset_theta or self.theta is None) else self.theta
        eta = param_dict(self.rater)
        n = self.local_subproblems
        grads: dict[str, torch.Tensor] = {}
        thetas: dict[str, torch.Tensor] = {}
        outer_loss, infos, finite = 0.0, {}, True
        for j in range(n):
            part = info.rank * n + j
            batches = self.inner_batches(outer, part)
            problem = make_problem(
                self.backbone, self.rater, self.diffusion, batches, self.validation_batch(outer, part),
                inner_optimizer=m.inner_optimizer, inner_lr=m.inner_lr, inner_options=m.inner_options,
            )
            result = self.meta_opt.meta_gradient(problem, theta, eta)
            finite &= all(bool(torch.isfinite(g).all()) for g in result.grad.values())
            finite &= math.isfinite(result.outer_loss)
            for key, g in result.grad.items():
                grads[key] = grads[key] + g / n if key in grads else g / n
            if not m.reset_theta:
                for key, v in result.theta.items():
                    thetas[key] = thetas[key] + v.detach() / n if key in thetas else v.detach() / n
            outer_loss += result.outer_loss / n
            infos = result.info
        flag = torch.tensor([0.0 if finite else 1.0], device=info.device)
        if float(all_reduce_mean(flag, info)) > 0:
            self._stop_on_nan(outer)
        for name, p in self.rater.named_parameters():
            if p.requires_grad:
                p.grad = all_reduce_mean(grads[name].to(p.dtype).clone(), info)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.rater.parameters(), m.rater_grad_clip if m.rater_grad_clip else float("inf")
        )
        self.rater_opt.step()
        if not m.reset_theta:
            self.theta = {k: all_reduce_mean(v.clone(), info) for k, v in thetas.items()}
        stats = {
            "meta/val_loss": float(all_reduce_mean(torch.tensor([outer_loss], device=info.device), info)),
            "meta/grad_norm": float(grad_norm),
        }
        stats.update({f"meta/{k}": v for k, v in group_stats(self.rater, param_dict(self.rater), batches[0]).items()})
        stats.update({f"meta/info/{k}": float(v) for k, v in infos.items()})
        return stats

    def _stop_on_nan(self, outer: int) -> None:
        """Keep the last good rater (the one before this update) and stop with one line."""
        latest = ckpt.latest_checkpoint(self.ckpt_dir)
        if latest is None or int(ckpt.read_meta(latest)["step"]) != outer:
            self.save_checkpoint()
        last = ckpt.latest_checkpoint(self.ckpt_dir)
        raise UserError(
            f"meta-gradient became NaN/inf at outer step {outer + 1}; stopped. The last good rater "
            f"(after step {outer}) is in '{last}'. Lower meta.rater_lr or meta.inner_lr, or set "
            "meta.rater_grad_clip"
        )

    def log_scalars(self, scalars: dict[str, float]) -> None:
        self.log.scalars(scalars, self.step)

    def _identity(self) -> dict:
        assert self.recipe.rater is not None
        return {"name": self.recipe.rater.name, "params": self.rater_params}

    def save_checkpoint(self) -> None:
        if self.info.is_main:
            opt_tensors, opt_meta = ckpt.optimizer_to_flat(self.rater_opt.state_dict())
            tensors = {RATER_GROUP: self.rater.state_dict(), "rater_optimizer": opt_tensors}
            if self.theta is not None:
                tensors["theta"] = self.theta
            meta = {
                RATER_GROUP: self._identity(),
                "optimizer": opt_meta,
                "latent_shape": list(self.latent_shape),
                "num_classes": self.num_classes,
                "pretrained": str(self.pretrained),
                "meta": self.recipe.meta.model_dump(mode="json"),
            }
            ckpt.save_checkpoint(self.ckpt_dir, self.step, tensors, meta, keep=self.recipe.train.keep_checkpoints)
        barrier(self.info)

    def _restore(self) -> None:
        path = ckpt.latest_checkpoint(self.ckpt_dir)
        if path is None:
            raise CheckpointError(f"--resume: no checkpoint in '{self.ckpt_dir}'")
        meta = ckpt.read_meta(path)
        if meta.get(RATER_GROUP) != self._identity():
            raise CheckpointError(
                f"checkpoint '{path}' holds rater {meta.get(RATER_GROUP)}, but the recipe builds {self._identity()}"
            )
        ckpt.load_state_into(self.rater, ckpt.load_tensors(path, RATER_GROUP, self.info.device), str(path))
        flat = ckpt.load_tensors(path, "rater_optimizer", self.info.device)
        self.rater_opt.load_state_dict(ckpt.optimizer_from_flat(flat, meta["optimizer"]))
        if (path / "theta.safetensors").is_file():
            self.theta = ckpt.load_tensors(path, "theta", self.info.device)
        self.step = int(meta["step"])

    def evaluate(self) -> dict[str, float]:
        return {}

    def cleanup(self) -> None:
        self.log.close()
