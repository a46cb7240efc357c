"""What a first run on a GPU must check before the paper's recipe is trusted to it.

    python benchmarks/gpu_checks.py [--device cuda] [--quick]     # part 1 of gpu_suite.py

Each check prints one line as soon as it is done, ``ok`` or ``FAIL`` with its numbers, and
the script goes on after a failure (exit code 1 if any failed); in the order run:

1. the process group's timeout is the recipe's ``train.dist_timeout``, and TF32 is on for
   float32 matmuls and convolutions (off with ``train.tf32: false``);
2. a training step waits for the device at logging steps only: the optimizer's ``step``
   counters sit where the optimizer reads them without a sync, and steps between logging
   steps make no synchronizing call (``torch.cuda.set_sync_debug_mode``), fresh and after
   loading a checkpoint, vanilla and with selection;
3. a compiled rater replayed with new inputs, and chunked ``NormRater`` scoring, against
   eager (a CUDA graph's output buffer is reused by the next replay);
4. bf16 blocked-attention meta-gradients against float32 ones (the stated tolerance: 5%
   relative, cosine above 0.999);
5. the time of a 50,000-sample evaluation of DiT-S/2 (250 DDIM steps, guidance, the VAE's
   decoder at 256x256), extrapolated from a timed batch, per GPU count;
6. compiled bf16 selection's top-1 against eager float32, with the paper's rater.

``--quick`` (or a device without CUDA) shrinks everything; the CUDA-only checks then say so.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable

import torch

RESULTS: list[bool] = []


def check(title: str) -> Callable[[Callable[..., str]], Callable[..., None]]:
    def wrap(fn: Callable[..., str]) -> Callable[..., None]:
        def run(*args: object) -> None:
            start = time.perf_counter()
            try:
                line, ok = fn(*args), True
                if line.startswith("FAIL"):
                    ok = False
            except Exception as exc:  # noqa: BLE001 - a check that breaks is a finding, not the end
                line, ok = f"FAIL ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})", False
                traceback.print_exc()
            RESULTS.append(ok)
            print(f"- {title}: {line} ({time.perf_counter() - start:.1f} s)", flush=True)
        return run
    return wrap


@check("process group timeout and TF32")
def group_and_tf32(device: torch.device) -> str:
    from noisevalue import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + os.getpid() % 500))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    distributed.init(device.type, timeout_s=1234.0, tf32=True, group=True)
    timeout = distributed.process_group_timeout()
    on = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    distributed.use_tf32(False)
    off = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    distributed.use_tf32(True)
    torch.distributed.destroy_process_group()
    tf32_ok = device.type != "cuda" or (on == (True, True) and off == (False, False))
    ok = timeout == 1234.0 and tf32_ok
    return f"{'ok' if ok else 'FAIL'}: timeout {timeout} s (asked 1234), TF32 on {on}, off {off}" + (
        "" if device.type == "cuda" else " (TF32: no CUDA here)")


def _trainer(run_dir: str, device: torch.device, extra: list[str]):  # type: ignore[no-untyped-def]
    from noisevalue.config import load_recipe
    from noisevalue.distributed import DistInfo
    from noisevalue.train.diffusion_training import DiffusionTraining

    recipe = load_recipe("digits", ["workflow=pretrain", "train.steps=40", "train.log_every=20", "eval.loss_draws=0",
                                    "eval.evaluators=[]", f"train.device={device.type}", "train.compile=false",
                                    f"output_dir={run_dir}", *extra])
    trainer = DiffusionTraining(recipe, run_dir, DistInfo(device=device))
    trainer.setup()
    return trainer


def _syncs(trainer, steps: range) -> int:  # type: ignore[no-untyped-def]
    """Synchronizing calls warned about during ``steps`` (none of them a logging step);
    counted on CUDA only (the steps run anywhere)."""
    for step in range(steps.start - 2, steps.start):  # warm-up: lazy state, kernels, allocator
        trainer.train_step(step)
    cuda = trainer.info.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            for step in steps:
                trainer.train_step(step)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


@check("host syncs per training step, optimizer step counters")
def training_syncs(device: torch.device) -> str:
    cuda = device.type == "cuda"
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in (("vanilla", []), ("max_norm k=4", ["train.selector={name: max_norm, params: {k: 4}}"])):
            trainer = _trainer(f"{tmp}/{label}", device, extra)
            syncs = _syncs(trainer, range(5, 15))
            trainer.step = 15
            trainer.check_finite(15)
            trainer.save_checkpoint()
            resumed = _trainer(f"{tmp}/{label}-init", device, [*extra, f"train.init_from={tmp}/{label}"])
            steps = {str(s["step"].device) for s in resumed.optimizer.state.values()}
            resumed_syncs = _syncs(resumed, range(20, 30))
            found.append(f"{label}: {syncs} syncs in 10 steps, {resumed_syncs} after loading, step counters on {steps}")
            want = {str(device)} if resumed.fused else {"cpu"}
            if (cuda and (syncs or resumed_syncs)) or steps != {str(d) for d in want}:
                return "FAIL: " + "; ".join(found)
    return ("ok: " if cuda else "ok (no CUDA: syncs not counted): ") + "; ".join(found)


@check("50,000-sample evaluation, extrapolated")
def evaluation_time(device: torch.device, quick: bool) -> str:
    from diffusers import AutoencoderKL

    from noisevalue.backbones.dit import DiT_S_2, DiT_Tiny_2
    from noisevalue.data.encoders import VAEEncoder
    from noisevalue.diffusion import Diffusion
    from noisevalue.train.batches import image_generators
    from noisevalue.train.evaluate import Sampling, draw_images

    size = 8 if quick else 32
    net = (DiT_Tiny_2 if quick else DiT_S_2)(input_size=size, in_channels=4, num_classes=1000, learn_sigma=True)
    torch.manual_seed(0)
    channels = (8, 8, 8, 8) if quick else (128, 256, 512, 512)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=channels, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=4 if quick else 32, layers_per_block=1 if quick else 2)
    encoder = VAEEncoder.from_vae(vae, sample=False)
    model = net.to(device).eval()
    encoder.to(device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    sampling = Sampling(num_steps=5 if quick else 250, eta=0.0, cfg_scale=1.25, precision=precision)
    batch = 4 if quick else 125
    times = []
    for rep in range(2):  # the first batch pays for lazy initialisation
        labels = torch.arange(batch) % 1000
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        draw_images(model, Diffusion(), encoder, (4, size, size), 1000, labels,
                    image_generators(0, rep * batch, (rep + 1) * batch), sampling, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    per_image = times[-1] / batch
    full = per_image * 50000 * 250 / sampling.num_steps  # at the recipe's 250 steps
    shown = ", ".join(f"{n} GPU(s) {full / n / 60:.1f} min" for n in (1, 8, 16))
    return (f"ok: {per_image * 1000:.1f} ms an image ({sampling.num_steps} steps, batch {batch}, "
            f"{'DiT-Tiny/2, tiny VAE' if quick else 'DiT-S/2, the sd-vae-ft-mse decoder (random weights)'}); "
            f"50,000 samples at 250 steps: {shown} (sampling and decoding; Inception features add little)")


@check("bf16 blocked-attention meta-gradients against float32")
def bf16_meta(device: torch.device, quick: bool) -> str:
    from noisevalue.backbones.dit import DiT_S_2, DiT_Tiny_2
    from noisevalue.diffusion import Diffusion
    from noisevalue.meta import GroupedBatch, PlainBatch, Unrolled, make_problem, param_dict
    from noisevalue.raters.dual_stream import dual_stream, dual_stream_tiny

    size, groups, k, steps = (8, 2, 4, 2) if quick else (32, 1, 8, 2)
    torch.manual_seed(0)
    backbone = (DiT_Tiny_2 if quick else DiT_S_2)(input_size=size, in_channels=4, num_classes=10).to(device)
    for p in backbone.parameters():  # away from the zero-initialised gates: every path carries signal
        p.data.add_(0.02 * torch.randn_like(p))
    rater = (dual_stream_tiny if quick else dual_stream)(input_size=size, in_channels=4, num_classes=10).to(device)
    g = torch.Generator().manual_seed(1)

    def batch(n: int, kk: int) -> tuple:
        return (torch.randn(n, 4, size, size, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device),
                torch.randint(0, 1000, (n,), generator=g).to(device), torch.randn(n, kk, 4, size, size, generator=g).to(device))

    inner = [GroupedBatch(*batch(groups, k)) for _ in range(steps)]
    x0, y, t, noise = batch(2, 1)
    val = PlainBatch(x0, y, t, noise[:, 0])
    diffusion = Diffusion()

    def grad(precision: str, block: int | None) -> torch.Tensor:
        problem = make_problem(backbone, rater, diffusion, inner, val, "sgd", 1e-2, attention_block=block,
                               precision=precision)
        out = Unrolled("mixed").meta_gradient(problem, param_dict(backbone), param_dict(rater)).grad
        return torch.cat([v.flatten().double() for v in out.values()])

    full, half = grad("fp32", None), grad("bf16", 64)
    rel = float((half - full).norm() / full.norm())
    cos = float(torch.nn.functional.cosine_similarity(half, full, dim=0))
    ok = rel < 0.05 and cos > 0.999
    return f"{'ok' if ok else 'FAIL'}: relative difference {rel:.2%}, cosine {cos:.5f} (tolerance 5%, 0.999)"


def _selector(rater, device, compile: bool, precision: str, batch_size: int | None = None):  # type: ignore[no-untyped-def]
    from noisevalue.selectors.builtin import RaterSelector

    return RaterSelector(k=4, rater=rater.to(device), batch_size=batch_size, precision=precision,
                         compile=compile).to(device)


@check("compiled bf16 selection's top-1 against eager float32")
def selection_agreement(device: torch.device, quick: bool) -> str:
    from noisevalue.raters.dual_stream import dual_stream, dual_stream_tiny

    size, n = (8, 64) if quick else (32, 512)
    torch.manual_seed(0)
    rater = (dual_stream_tiny if quick else dual_stream)(input_size=size, in_channels=4, num_classes=10).eval()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(n, 4, size, size, generator=g).to(device)
    y, t = torch.randint(0, 10, (n,), generator=g).to(device), torch.randint(0, 1000, (n,), generator=g).to(device)
    cand = torch.randn(n, 4, 4, size, size, generator=g).to(device)
    cuda = device.type == "cuda"
    fast = _selector(rater, device, compile=cuda, precision="bf16" if cuda else "fp32", batch_size=n * 4 // 2)
    slow = _selector(rater, device, compile=False, precision="fp32")
    a, b = fast.scores(x0, y, t, cand), slow.scores(x0, y, t, cand)
    agree = float((a.argmax(1) == b.argmax(1)).float().mean())
    gap = b.topk(2, dim=1).values
    close = float(((gap[:, 0] - gap[:, 1]) < 0.01 * b.abs().max()).float().mean())
    ok = agree >= 0.95 and a.dtype == torch.float32
    return (f"{'ok' if ok else 'FAIL'}: the same top-1 for {agree:.1%} of {n} samples (scores {a.dtype}; "
            f"{close:.1%} of the float32 top-2 gaps below 1% of the score range)")


@check("compiled rater replayed with new inputs; chunked NormRater scoring")
def replays(device: torch.device, quick: bool) -> str:
    from noisevalue.raters.dual_stream import dual_stream_tiny
    from noisevalue.raters.norm import NormRater

    cuda = device.type == "cuda"
    size, n = 8, 16
    torch.manual_seed(0)
    rater = dual_stream_tiny(input_size=size, in_channels=4, num_classes=10).eval()
    compiled = _selector(rater, device, compile=cuda, precision="fp32", batch_size=n * 4 // 4)
    eager = _selector(rater, device, compile=False, precision="fp32")
    worst = 0.0
    for seed in (3, 4):  # the second call replays the graphs with new inputs
        g = torch.Generator().manual_seed(seed)
        x0 = torch.randn(n, 4, size, size, generator=g).to(device)
        y, t = torch.randint(0, 10, (n,), generator=g).to(device), torch.randint(0, 1000, (n,), generator=g).to(device)
        cand = torch.randn(n, 4, 4, size, size, generator=g).to(device)
        a, b = compiled.scores(x0, y, t, cand), eager.scores(x0, y, t, cand)
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    norm = NormRater()
    chunked = _selector(norm, device, compile=cuda, precision="bf16" if cuda else "fp32", batch_size=8)
    plain = _selector(NormRater(), device, compile=False, precision="fp32")
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(n, 4, size, size, generator=g).to(device)
    cand = torch.randn(n, 4, 4, size, size, generator=g).to(device)
    t = torch.zeros(n, dtype=torch.long, device=device)
    c, d = chunked.scores(x0, None, t, cand), plain.scores(x0, None, t, cand)
    norm_err = float((c - d).abs().max() / d.abs().max())
    same_pick = bool(torch.equal(c.argmax(1), d.argmax(1)))
    ok = worst < 1e-3 and norm_err < 1e-2 and same_pick
    return (f"{'ok' if ok else 'FAIL'}: rater, 2 calls of 4 chunks: largest relative difference {worst:.1e}; "
            f"NormRater in chunks of 8: {norm_err:.1e}, same picks {same_pick}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
        device = torch.device("cuda", torch.cuda.current_device())
    quick = args.quick or device.type != "cuda"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}"
          f"{', quick sizes' if quick else ''}", flush=True)
    # cheapest first: within the suite's minute, a check cut short keeps the lines before it
    group_and_tf32(device)
    training_syncs(device)
    replays(device, quick)
    bf16_meta(device, quick)
    evaluation_time(device, quick)
    selection_agreement(device, quick)  # compiles the paper's rater with CUDA graphs: the slowest
    failed = RESULTS.count(False)
    print(f"{len(RESULTS) - failed} of {len(RESULTS)} checks ok", flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
