"""Diffusion training, as a recipe class: stage (i) with i.i.d. noise, and stage (iii),
the continuation where a NoiseSelector picks each sample's noise among k candidates.

Shape borrowed from torchtune's recipes: ``setup`` builds everything and restores a
checkpoint, ``train`` runs the loop, ``save_checkpoint`` writes one, ``evaluate`` samples
and scores, ``cleanup`` closes writers. Multi-process runs use DDP; only rank 0 logs and
writes. Every random draw is seeded per (seed, step), see :mod:`batches`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from noisevalue import checkpoint as ckpt
from noisevalue import faults, registry
from noisevalue.diffusion import Diffusion
from noisevalue.distributed import all_reduce_mean, all_reduce_sum, barrier
from noisevalue.ema import EMA, unwrap
from noisevalue.errors import CheckpointError
from noisevalue.interfaces import NULL_TIMESTEP, TrainingContext
from noisevalue.train import evaluate as ev
from noisevalue.train.batches import (
    STREAM_EVAL,
    STREAM_ORACLE,
    STREAM_SELECT,
    STREAM_TIME_DROP,
    STREAM_TIMESTEP,
    GlobalOrder,
    draw_step,
    local_batch_size,
    seeded_generator,
    validation_split,
)
from noisevalue.train.build import backbone_params, build_backbone, build_evaluators
from noisevalue.train.data import load_train_data
from noisevalue.train.preflight import check_guidance, require_backbone
from noisevalue.train.progress import StepProgress
from noisevalue.train.trainer import Trainer

SAMPLER_GROUP = "timestep_sampler"  # tensor group of an adaptive timestep sampler's state


class DiffusionTraining(Trainer):
    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        r, info = self.recipe, self.info
        self.set_threads()
        self.evaluators = build_evaluators(r) if info.is_main else []
        self.selector = registry.build("selector", r.train.selector, where="train.selector")
        self.weighting = registry.build("loss_weighting", r.train.loss_weighting, where="train.loss_weighting")
        self.timesteps = registry.build("timestep_sampler", r.train.timestep_sampler, where="train.timestep_sampler")
        self.data, self.encoder = load_train_data(r, self.run_dir, info)
        pixels = self.encoder.pixel_space and hasattr(self.data, "images")
        train_set = _ImagesView(self.data.images) if pixels else None  # type: ignore[attr-defined]
        self.evaluation = ev.EvaluationSuite(r, self.evaluators, train_set)
        self.encoder.to(info.device)
        self.latent_shape = self.data.latent_shape
        self.num_classes = self.data.num_classes
        self.local_batch = local_batch_size(r.train.global_batch_size, info.world_size)
        self.model_params = backbone_params(r, self.latent_shape, self.num_classes)
        torch.manual_seed(r.seed)  # identical initial weights on every rank
        model = build_backbone(r, self.model_params).to(info.device)
        self.drop_prob = float(model.class_dropout_prob) if self.num_classes else 0.0
        check_guidance(r, model, self.num_classes)
        self.time_drop = float(model.time_dropout_prob)
        self.diffusion = Diffusion.from_config(r.diffusion)
        all_t = torch.arange(self.diffusion.num_timesteps)
        self.timesteps.bind(self.diffusion.alphas_cumprod, self.weighting.weight(self.diffusion.snr(all_t)).double())
        self.ema = EMA(model, r.train.ema_decay, warmup=r.train.ema_warmup)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=r.train.lr,
            betas=r.train.betas,
            eps=r.train.adam_eps,
            weight_decay=r.train.weight_decay,
        )
        self.model: torch.nn.Module = model
        self.selector.check_compatible(self.latent_shape, self.num_classes)
        self.selector.to(info.device)
        self.context: TrainingContext | None = None
        if self.selector.needs_training_context:
            _, self.val_idx = validation_split(self.data.num_items, r.meta.val_fraction, r.seed)
            self.val_order = GlobalOrder(len(self.val_idx), r.seed + 2)
            self.context = TrainingContext(model=model, diffusion=self.diffusion,
                                           validation_batch=self._validation_batch)
            self.selector.bind(self.context)
        self.heldout = (
            ev.HeldoutLoss(r, self.encoder, self.num_classes, info.device)
            if info.is_main and r.eval.loss_draws else None
        )
        self.window_loss, self.window_steps = 0.0, 0  # the training-loss log window
        if self.resume:
            self._restore()
        elif r.train.init_from:
            self.load(ckpt.resolve_checkpoint(r.train.init_from), with_optimizer=True)
        # evaluations are counted from where this run started (a continuation's origin)
        self.origin = ckpt.read_meta(ckpt.resolve_checkpoint(r.train.init_from)).step if r.train.init_from else 0
        if info.distributed:
            ids = [info.device.index] if info.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if r.train.compile:
            self.model = torch.compile(self.model)  # type: ignore[assignment]
        self.order = GlobalOrder(self.data.num_items, r.seed)
        self.open_log()

    def _identity(self) -> ckpt.Identity:
        return ckpt.Identity(name=self.recipe.model.name, params=self.model_params)

    def _validation_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``n`` held-out samples for the current step (a selector's TrainingContext)."""
        r, dev = self.recipe, self.info.device
        assert self.context is not None
        step = self.context.step
        idx = self.val_idx[self.val_order.batch(step, n)]
        draws = draw_step(r.seed, step, n, self.latent_shape, self.diffusion.num_timesteps, self.drop_prob,
                          r.data.random_flip, stream=STREAM_ORACLE)
        x0, y = self.data.fetch(idx, draws.flip)
        y_in = None
        if self.num_classes:
            y_in = torch.where(draws.drop, torch.full_like(y, self.num_classes), y).to(dev)
        return x0.to(dev), y_in, draws.t.to(dev), draws.noise[:, 0].to(dev)

    def _restore(self) -> None:
        path = self.checkpoint_to_resume()
        self.load(path, with_optimizer=True)
        if (path / f"{SAMPLER_GROUP}.safetensors").is_file():  # this run's own adaptive state
            self.timesteps.load_state_dict(ckpt.load_tensors(path, SAMPLER_GROUP))

    def load(self, path: Path, with_optimizer: bool) -> None:
        meta = ckpt.read_meta(path)
        require_backbone(path, meta, self._identity())
        model = unwrap(self.model)
        ckpt.load_state_into(model, ckpt.load_tensors(path, "model", self.info.device), str(path))
        ema_state = ckpt.load_tensors(path, "ema", self.info.device)
        ckpt.check_state(model.state_dict(), ema_state, f"{path} (ema)")
        self.ema.load_state_dict(ema_state)
        if with_optimizer:
            flat = ckpt.load_tensors(path, "optimizer", self.info.device)
            try:
                self.optimizer.load_state_dict(ckpt.optimizer_from_flat(flat, meta.optimizer or {}))
            except (KeyError, ValueError) as exc:
                raise CheckpointError(f"checkpoint '{path}': optimizer state does not fit ({exc})") from None
            t = self.recipe.train  # the recipe's settings, not the saved ones (a change accepted on resume)
            for group in self.optimizer.param_groups:
                group.update(lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps, weight_decay=t.weight_decay)
        self.step = meta.step
        if self.resume:  # the log window open at the kill and the skip count, continued
            if meta.log_window:
                self.window_loss = float(meta.log_window["loss_sum"])
                self.window_steps = int(meta.log_window["steps"])
            self.skipped = meta.skipped or 0

    # ------------------------------------------------------------------ training
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.recipe.train.precision == "bf16":
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, step: int) -> float:
        r, info = self.recipe, self.info
        idx = self.order.batch(step, r.train.global_batch_size)
        draws = draw_step(
            r.seed, step, r.train.global_batch_size, self.latent_shape,
            self.diffusion.num_timesteps, self.drop_prob, r.data.random_flip, k=self.selector.k,
        )
        u = torch.rand(len(draws.t), generator=seeded_generator(r.seed, step, STREAM_TIMESTEP), dtype=torch.float64)
        draws = dataclasses.replace(draws, t=self.timesteps.resample(draws.t, u))
        lo, hi = info.rank * self.local_batch, (info.rank + 1) * self.local_batch
        mine = draws.slice(lo, hi)
        x0, y = self.data.fetch(idx[lo:hi], mine.flip)
        dev = info.device
        x0, t = x0.to(dev), mine.t.to(dev)
        y_in = None
        if self.num_classes:
            y_in = torch.where(mine.drop, torch.full_like(y, self.num_classes), y).to(dev)
        candidates = mine.noise.to(dev)
        if candidates.shape[1] == 1 and self.selector.pool == "sample":
            noise = candidates[:, 0]
        else:  # the selector sees the dropped label, as the rater did in meta-training
            if self.context is not None:
                self.context.step = step
            with torch.no_grad():
                pick = self.selector.select(
                    x0, y_in, t, candidates, generator=seeded_generator(r.seed, step, STREAM_SELECT, info.rank)
                )
            if self.selector.pool == "batch":  # indices into the whole batch's candidates
                noise = candidates.flatten(0, 1)[pick]
            else:
                noise = candidates[torch.arange(len(pick), device=dev), pick]
        t_cond = None
        if self.time_drop > 0:  # the time condition dropped to the null time (seeded, own stream)
            g = seeded_generator(r.seed, step, STREAM_TIME_DROP)
            dropped = (torch.rand(r.train.global_batch_size, generator=g) < self.time_drop)[lo:hi].to(dev)
            t_cond = torch.where(dropped, torch.full_like(t, NULL_TIMESTEP), t)
        with self._autocast():
            losses = self.diffusion.per_sample_loss(self.model, x0, t, y_in, noise, t_cond)
            loss = (losses * self.weighting.weight(self.diffusion.snr(t)).to(losses.dtype)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if r.train.grad_clip:  # its norm, taken once: clipping a non-finite step is harmless, it is discarded
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.train.grad_clip)
        else:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
        bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()) and torch.isfinite(norm)) else 1.0], device=dev)
        if float(all_reduce_sum(bad, info)) > 0:  # on any rank: every rank skips or stops alike
            self._nonfinite(step)
            return math.nan
        self.optimizer.step()
        self.ema.update(self.model, step)
        stats = self.timesteps.statistics(t, losses.detach())  # None (no transfer) unless it adapts
        if stats is not None:  # summed over processes: every rank adapts the same way
            self.timesteps.update(all_reduce_sum(stats.to(dev), info).cpu(), step + 1)
        return float(all_reduce_mean(loss.detach().clone(), info))

    def _nonfinite(self, step: int) -> None:
        """A non-finite loss or gradient at ``step``: no update happened; skip it (within
        ``train.max_skips``) or stop with the last good weights saved and named."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skip_or_stop(step, "training diverged: non-finite loss or gradient at step", "weights",
                          "Lower train.lr, set train.grad_clip, or use train.nonfinite=skip")

    def _evaluation_lost(self) -> bool:
        """A resumed run whose checkpoint step was due an evaluation that never reached
        ``metrics.json`` (killed between publishing the checkpoint and evaluating)."""
        r, step = self.recipe, self.step
        if not (r.eval.every and step > self.origin and (step - self.origin) % r.eval.every == 0):
            return False
        if step >= r.train.steps:  # the final evaluation runs after the loop anyway
            return False
        path = self.run_dir / "metrics.json"
        done = json.loads(path.read_text()).get("history", []) if path.is_file() else []
        return not any(row.get("step") == step for row in done)

    def train(self) -> None:
        r = self.recipe
        if self.resume and self._evaluation_lost():
            self.evaluate()  # the same EMA weights and seeds: the evaluation the kill lost, exactly
        total = r.train.steps
        window_start, timed_steps = time.perf_counter(), 0
        with StepProgress("train", total, self.step, enabled=self.info.is_main, print_every=r.train.log_every * 4) as bar:
            while self.step < total:
                loss = self.train_step(self.step)
                self.step += 1
                faults.point("train.step")
                timed_steps += 1
                if not math.isnan(loss):  # a skipped step (train.nonfinite=skip) is not averaged
                    self.window_loss += loss
                    self.window_steps += 1
                bar.advance(loss=loss)
                if self.step % r.train.log_every == 0 or self.step == total:
                    scalars = {"train/lr": r.train.lr}
                    if self.window_steps:
                        scalars = {"train/loss": self.window_loss / self.window_steps, **scalars}
                    if self.skipped:
                        scalars["train/skipped_steps"] = float(self.skipped)
                    self.log_scalars(scalars)
                    elapsed = time.perf_counter() - window_start
                    self.log.timings({"train/images_per_sec": timed_steps * r.train.global_batch_size / max(elapsed, 1e-9)},
                                     self.step)
                    self.window_loss, self.window_steps = 0.0, 0
                    window_start, timed_steps = time.perf_counter(), 0
                if self.step % r.train.ckpt_every == 0 or self.step == total:
                    self.save_checkpoint()
                if r.eval.every and (self.step - self.origin) % r.eval.every == 0 and self.step != total:
                    self.evaluate()

    def save_checkpoint(self) -> None:
        if self.info.is_main:
            opt_tensors, opt_meta = ckpt.optimizer_to_flat(self.optimizer.state_dict())
            meta = ckpt.CheckpointMeta(
                step=self.step, backbone=self._identity(), optimizer=opt_meta, recipe=self.recipe.name,
                seed=self.recipe.seed, latent_shape=self.latent_shape, num_classes=self.num_classes,
                diffusion=self.recipe.diffusion.model_dump(),
                log_window={"loss_sum": self.window_loss, "steps": self.window_steps}, skipped=self.skipped,
            )
            tensors = {
                "model": unwrap(self.model).state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": opt_tensors,
            }
            sampler_state = self.timesteps.state_dict()
            if sampler_state:
                tensors[SAMPLER_GROUP] = sampler_state
            ckpt.save_checkpoint(self.ckpt_dir, tensors, meta, *self.retention())
        barrier(self.info)

    # ------------------------------------------------------------------ evaluation
    def ema_model(self) -> torch.nn.Module:
        model = copy.deepcopy(unwrap(self.model))
        if self.recipe.sample.use_ema:
            model.load_state_dict(self.ema.state_dict())
        return model.eval()

    def evaluate(self) -> dict[str, float]:
        """Sample grid and evaluator metrics on rank 0; written to disk and TensorBoard."""
        metrics: dict[str, float] = {}
        if self.info.is_main:
            r, dev = self.recipe, self.info.device
            model = self.ema_model()
            images, nrow = ev.sample_grid(
                model, self.diffusion, self.encoder, self.latent_shape, self.num_classes, r, dev, self.step
            )
            ev.save_png_atomic(images, self.run_dir / "samples" / f"step_{self.step:07d}.png", nrow)
            faults.point("evaluate.grid")
            labels = ev.class_labels(r.eval.num_samples, self.num_classes)
            if self.heldout is not None:
                metrics[ev.HELDOUT_LOSS] = self.heldout(model, self.diffusion)
            if self.evaluators:
                generated = ev.generate(
                    model, self.diffusion, self.encoder, r.eval.num_samples, labels,
                    self.latent_shape, self.num_classes, r, dev, (r.seed, STREAM_EVAL),
                )
                metrics.update(self.evaluation.evaluate(generated))
            ev.update_metrics_file(self.run_dir / "metrics.json", self.step, metrics)
            self.log_scalars({f"eval/{k}": v for k, v in metrics.items()})
            from torchvision.utils import make_grid

            self.log.image("samples", make_grid(images, nrow=nrow), self.step)
        barrier(self.info)
        return metrics


class _ImagesView:
    """Pixel-space training images as a minimal dataset (for evaluation baselines)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)
