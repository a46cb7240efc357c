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
import json
import time
from pathlib import Path

import torch

from noisevalue import checkpoint as ckpt
from noisevalue import faults, registry
from noisevalue.backbones.dit_formats import (
    ForeignWeights,
    is_foreign,
    numerics_problem,
    read_foreign,
)
from noisevalue.diffusion import Diffusion
from noisevalue.distributed import all_reduce_mean, all_reduce_sum, barrier
from noisevalue.ema import EMA, unwrap
from noisevalue.errors import CheckpointError, ConfigError, UserError
from noisevalue.interfaces import NULL_TIMESTEP, TrainingContext
from noisevalue.train import evaluate as ev
from noisevalue.train import noise_stats as ns
from noisevalue.train.batches import (
    STREAM_ORACLE,
    STREAM_SELECT,
    STREAM_TIME_DROP,
    STREAM_TIMESTEP,
    GlobalOrder,
    draw_conditions,
    draw_noise,
    draw_step,
    local_batch_size,
    seeded_generator,
    to_device,
    validation_split,
)
from noisevalue.train.build import backbone_params, build_backbone, build_evaluators
from noisevalue.train.data import load_train_data
from noisevalue.train.preflight import check_guidance, require_backbone
from noisevalue.train.progress import StepProgress
from noisevalue.train.trainer import Trainer

SAMPLER_GROUP = "timestep_sampler"  # tensor group of an adaptive timestep sampler's state


class DiffusionTraining(Trainer):
    # the steps' accumulators on the device (read at logging steps): the loss sum and the
    # applied steps of the log window, the steps not applied and the first of them
    _window_loss: torch.Tensor
    _window_good: torch.Tensor
    _bad_steps: torch.Tensor
    _first_bad: torch.Tensor

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        r, info = self.recipe, self.info
        self.set_threads()
        self.evaluators = build_evaluators(r, info.device)  # on every rank: the evaluation is shared
        self.selector = registry.build("selector", r.train.selector, where="train.selector")
        self.weighting = registry.build("loss_weighting", r.train.loss_weighting, where="train.loss_weighting")
        self.timesteps = registry.build("timestep_sampler", r.train.timestep_sampler, where="train.timestep_sampler")
        self.data, self.encoder = load_train_data(r, self.run_dir, info)
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
        # on CUDA the fused AdamW: one kernel, and it skips a non-finite step by itself
        # (found_inf), so no step waits for the host to decide
        self.fused = info.device.type == "cuda"
        self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=r.train.lr,
            betas=r.train.betas,
            eps=r.train.adam_eps,
            weight_decay=r.train.weight_decay,
            fused=self.fused or None,
        )
        self.model: torch.nn.Module = model
        self.selector.check_compatible(self.latent_shape, self.num_classes)
        self.selector.to(info.device)
        self.context: TrainingContext | None = None
        if self.selector.needs_training_context:
            _, self.val_idx = validation_split(self.data.num_items, r.meta.val_fraction, r.seed)
            self.val_order = GlobalOrder(len(self.val_idx), r.seed + 2)
            self.context = TrainingContext(model=model, diffusion=self.diffusion,
                                           validation_batch=self._validation_batch, optimizer=self.optimizer)
            self.selector.bind(self.context)
        pixels = self.encoder.pixel_space and hasattr(self.data, "images")
        train_set = _ImagesView(self.data.images) if pixels else None  # type: ignore[attr-defined]
        self.evaluation = ev.Evaluation(r, self.evaluators, info, self.encoder, self.latent_shape, self.num_classes,
                                        self.diffusion, train_set)
        self.window_loss, self.window_steps = 0.0, 0  # the training-loss log window, on the host
        self._reset_device_window()
        self.noise_stats = ns.NoiseStats(self.latent_shape, self.diffusion.num_timesteps, info.device)
        # weights from outside noisevalue start at step 0; a checkpoint's run is continued
        continued = r.train.init_from if r.train.init_from and not is_foreign(r.train.init_from) else None
        if self.resume:
            self._restore()
        elif continued:
            self.load(ckpt.resolve_checkpoint(continued), with_optimizer=True)
        elif r.train.init_from:
            weights = read_foreign(r.train.init_from)
            assert weights is not None  # is_foreign
            self.load_foreign(weights)
        # evaluations are counted from where this run started (a continuation's origin)
        self.origin = ckpt.read_meta(ckpt.resolve_checkpoint(continued)).step if continued else 0
        if info.distributed:
            ids = [info.device.index] if info.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if r.train.compile:
            self.model = torch.compile(self.model)  # type: ignore[assignment]
        self.order = GlobalOrder(self.data.num_items, r.seed)
        self.open_log()

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Train on with ``optimizer`` in place of the recipe's AdamW (over the same
        parameters; what its state holds is the caller's choice): the ladder experiment's
        plain SGD steps. The selector's context sees it too."""
        self.optimizer = optimizer
        self.fused = bool(optimizer.defaults.get("fused"))  # only a fused one reads found_inf
        if self.context is not None:
            self.context.optimizer = optimizer

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
            y_in = to_device(torch.where(draws.drop, torch.full_like(y, self.num_classes), y), dev)
        return to_device(x0, dev), y_in, to_device(draws.t, dev), to_device(draws.noise[:, 0], dev)

    def _restore(self) -> None:
        path = self.checkpoint_to_resume()
        self.load(path, with_optimizer=True)
        if (path / f"{SAMPLER_GROUP}.safetensors").is_file():  # this run's own adaptive state
            self.timesteps.load_state_dict(ckpt.load_tensors(path, SAMPLER_GROUP))
        if self.info.is_main and (path / f"{ns.GROUP}.safetensors").is_file():
            # the sums over every process so far: rank 0 carries them, the others add from 0
            self.noise_stats.load_state_dict(ckpt.load_tensors(path, ns.GROUP, self.info.device))

    def load(self, path: Path, with_optimizer: bool) -> None:
        meta = ckpt.read_meta(path)
        require_backbone(path, meta, self._identity())
        model = unwrap(self.model)
        ckpt.load_state_into(model, ckpt.load_tensors(path, "model", self.info.device), str(path))
        ema_state = ckpt.load_tensors(path, "ema", self.info.device)
        ckpt.check_state(model.state_dict(), ema_state, f"{path} (ema)")
        self.ema.load_state_dict(ema_state)
        if with_optimizer:
            # read on the CPU: load_state_dict moves the moments to their parameters and
            # leaves the step counters where a fresh optimizer keeps them (the host for
            # plain AdamW, so its steps do not sync; the device for the fused one)
            flat = ckpt.load_tensors(path, "optimizer")
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

    def load_foreign(self, weights: ForeignWeights) -> None:
        """Start from weights made outside noisevalue (an official DiT file, a diffusers
        folder): the model and its EMA take them; the optimizer starts fresh, at step 0."""
        where = f"train.init_from '{self.recipe.train.init_from}'"
        model = unwrap(self.model)
        problem = numerics_problem(model, weights)
        if problem is not None:
            raise ConfigError(f"{where}: {problem}")
        ckpt.load_state_into(model, weights.state, where)
        self.ema.load_state_dict(model.state_dict())

    # ------------------------------------------------------------------ training
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.recipe.train.precision == "bf16":
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step on this rank's slice of the global batch; returns the step's
        loss averaged over the processes (a device tensor). A non-finite loss or gradient on
        any rank is not applied (no update, no EMA) and counted in the device window
        (:meth:`check_finite` decides what happens). Nothing here waits for the device."""
        r, info, dev = self.recipe, self.info, self.info.device
        batch = r.train.global_batch_size
        lo, hi = info.rank * self.local_batch, (info.rank + 1) * self.local_batch
        t, drop, flip = draw_conditions(r.seed, step, batch, self.diffusion.num_timesteps, self.drop_prob,
                                        r.data.random_flip)
        u = torch.rand(batch, generator=seeded_generator(r.seed, step, STREAM_TIMESTEP), dtype=torch.float64)
        t = self.timesteps.resample(t, u)[lo:hi]  # over the global batch, as the sampler's contract says
        x0, y = self.data.fetch(self.order.batch(step, batch)[lo:hi], flip[lo:hi])
        x0, t = to_device(x0, dev), to_device(t, dev)
        y_in = None
        if self.num_classes:
            y_in = to_device(torch.where(drop[lo:hi], torch.full_like(y, self.num_classes), y), dev)
        candidates = to_device(draw_noise(r.seed, step, lo, hi, self.latent_shape, self.selector.k), dev)
        gain = None
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
            gain = getattr(self.selector, "last_gain", None)
        self.noise_stats.add(noise, t, gain)
        t_cond = None
        if self.time_drop > 0:  # the time condition dropped to the null time (seeded, own stream)
            g = seeded_generator(r.seed, step, STREAM_TIME_DROP)
            dropped = to_device((torch.rand(batch, generator=g) < self.time_drop)[lo:hi], dev)
            t_cond = torch.where(dropped, torch.full_like(t, NULL_TIMESTEP), t)
        with self._autocast():
            losses = self.diffusion.per_sample_loss(self.model, x0, t, y_in, noise, t_cond, hybrid=r.train.loss == "hybrid")
            loss = (losses * self.weighting.weight(self.diffusion.snr(t)).to(losses.dtype)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if r.train.grad_clip:  # its norm, taken once: clipping a non-finite step is harmless, it is not applied
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.train.grad_clip)
        else:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
        finite = torch.isfinite(loss.detach()) & torch.isfinite(norm)
        # on any rank: every rank applies or skips the step alike
        bad = all_reduce_sum((~finite).to(torch.float32).reshape(1), info).reshape(()).clamp(max=1)
        if self.fused:  # the fused kernel reads the flag on the device
            self.optimizer.found_inf = bad  # type: ignore[attr-defined]
            self.optimizer.step()
            self.ema.update(self.model, step, keep=1 - bad)
        elif not bad:  # on the CPU the flag is read at once: nothing to wait for
            self.optimizer.step()
            self.ema.update(self.model, step)
        self._bad_steps += bad
        self._first_bad = torch.where((bad > 0) & (self._first_bad < 0), step, self._first_bad)
        stats = self.timesteps.statistics(t, losses.detach())  # None (no transfer) unless it adapts
        if stats is not None:  # summed over processes: every rank adapts the same way
            self.timesteps.update(all_reduce_sum(stats.to(dev), info).cpu(), step + 1)
        mean = all_reduce_mean(loss.detach().float().reshape(1), info).reshape(())
        self._window_loss += torch.where(bad > 0, 0.0, mean).double()
        self._window_good += 1 - bad
        return mean

    def _reset_device_window(self) -> None:
        """The accumulators the steps add to on the device, read at logging steps only."""
        dev = self.info.device
        self._window_loss = torch.zeros((), dtype=torch.float64, device=dev)
        self._window_good = torch.zeros((), device=dev)
        self._bad_steps = torch.zeros((), device=dev)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=dev)

    def check_finite(self, step: int) -> None:
        """Read the device window into the host's (the one host sync of the loop) and apply
        ``train.nonfinite`` to the steps up to ``step`` that were not applied: skip them
        (within ``train.max_skips``) or stop with the current weights saved and named. The
        weights never took a non-finite step, so they are the last good ones."""
        self.window_loss += float(self._window_loss)
        self.window_steps += int(self._window_good)
        bad, first = int(self._bad_steps), int(self._first_bad)
        self._reset_device_window()
        if not bad:
            return
        r = self.recipe
        room = r.train.max_skips - self.skipped if r.train.nonfinite == "skip" else 0
        if bad <= room:
            self.skipped += bad
            return
        self.skipped += max(room, 0)
        self.optimizer.zero_grad(set_to_none=True)
        if self.newest_step() != step:
            self.save_checkpoint()  # the weights after `step`: finite, no non-finite step in them
        last = ckpt.latest_checkpoint(self.ckpt_dir)
        skipped = f" after skipping {self.skipped} step(s)" if self.skipped else ""
        raise UserError(
            f"training diverged: non-finite loss or gradient at step {first + 1}{skipped}; stopped at step {step}. "
            f"The last good weights (no non-finite step applied) are in '{last}'. Lower train.lr, set "
            "train.grad_clip, or use train.nonfinite=skip"
        )

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
                self.train_step(self.step)
                self.step += 1
                faults.point("train.step")
                timed_steps += 1
                log = self.step % r.train.log_every == 0 or self.step == total
                save = self.step % r.train.ckpt_every == 0 or self.step == total
                every = r.eval.every
                evaluate = every is not None and (self.step - self.origin) % every == 0 and self.step != total
                if not (log or save or evaluate):
                    bar.advance()
                    continue
                window = self.window_loss, self.window_steps
                self.check_finite(self.step)  # the loop's one wait for the device
                mean = (self.window_loss - window[0]) / max(self.window_steps - window[1], 1)
                bar.advance(**({"loss": mean} if self.window_steps > window[1] else {}))
                if log:
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
                if save:
                    self.save_checkpoint()
                if evaluate:
                    self.evaluate()

    def save_checkpoint(self) -> None:
        noise = self.noise_stats.reduced(self.info)  # a collective: before rank 0 writes
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
            tensors[ns.GROUP] = noise
            if noise["scalars"][0].sum() > 0:  # no file from a run of 0 steps
                # before the checkpoint: a kill between the two replays the steps and rewrites it
                ckpt.atomic_write_text(self.run_dir / ns.FILE,
                                       json.dumps({"step": self.step, **ns.summary(noise)}, indent=1) + "\n")
            ckpt.save_checkpoint(self.ckpt_dir, tensors, meta, *self.retention())
        barrier(self.info)

    # ------------------------------------------------------------------ evaluation
    def ema_model(self) -> torch.nn.Module:
        model = copy.deepcopy(unwrap(self.model))
        if self.recipe.sample.use_ema:
            model.load_state_dict(self.ema.state_dict())
        return model.eval()

    def evaluate(self) -> dict[str, float]:
        """The sample grid, the held-out loss and the evaluators' metrics, drawn and scored by
        every rank (each its share); rank 0 writes them to disk and TensorBoard."""
        start = time.perf_counter()
        model = self.ema_model()
        images, nrow = self.evaluation.grid(model)
        if images is not None:
            ev.save_png_atomic(images, self.run_dir / "samples" / f"step_{self.step:07d}.png", nrow)
        faults.point("evaluate.grid")
        metrics = self.evaluation.metrics(model)
        if self.info.is_main:
            ev.update_metrics_file(self.run_dir / "metrics.json", self.step, metrics, self.evaluation.protocols)
            self.log_scalars({f"eval/{k}": v for k, v in metrics.items()})
            from torchvision.utils import make_grid

            assert images is not None
            self.log.image("samples", make_grid(images, nrow=nrow), self.step)
            self.log.timings({"eval/seconds": time.perf_counter() - start}, self.step)
        barrier(self.info)
        return metrics


class _ImagesView:
    """Pixel-space training images as a minimal dataset (for evaluation baselines)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)
