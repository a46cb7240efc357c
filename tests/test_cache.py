"""``noisevalue cache``: the latent cache encoded by its own command (as fast-DiT's
extract_features.py), reused by a later run; its storage dtype; the loader workers."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from noisevalue.cli import app
from noisevalue.data.latent_cache import LatentCacheDataset
from noisevalue.train.data import AUTO_READERS_PER_GPU, loader_workers

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random AutoencoderKL saved as a local copy, and 12 images in 2 classes."""
    from tests.conftest import tiny_vae_and_images

    root = tmp_path_factory.mktemp("cache")
    tiny_vae_and_images(root)
    (root / "afile").write_text("not a folder")
    return root


def overrides(world, out):
    """The digits default turned into an image folder with the VAE (12 images, shards of 5)."""
    from tests.conftest import TINY

    return [
        *TINY, f"output_dir={out}", "~data.dataset.params", "~data.eval_dataset",
        "data.dataset.name=image_folder", f"data.dataset.params.root={world / 'images'}",
        "data.dataset.params.image_size=16", "data.random_flip=true", "data.cache_shard_size=5",
        "data.encoder.name=sd_vae", f"data.encoder.params.local_path={world / 'vae'}",
    ]


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def latents(cache: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    data = LatentCacheDataset(cache)
    everything = torch.arange(len(data))
    x, y = data.get_batch(everything)
    flipped, _ = data.get_batch(everything, flip_mask=torch.ones(len(data), dtype=torch.bool))
    return x, flipped, y


def test_cache_then_run_reuses_it_without_encoding(world, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["cache", *overrides(world, out)])
    assert result.exit_code == 0, (result.output, result.exception)
    cache = out / "latents"
    shards = sorted(cache.glob("shard_*.safetensors"))
    assert [p.name for p in shards] == [f"shard_0000{i}.safetensors" for i in range(3)]  # 12 items, shards of 5
    assert (cache / "index.json").is_file()
    assert [p.name for p in out.iterdir()] == ["latents"]  # the cache and nothing else
    size = sum(p.stat().st_size for p in cache.iterdir())
    assert f"latent cache {cache}: done; 12 items" in result.output and f"({size} bytes)" in result.output
    x, flipped, y = latents(cache)
    assert x.shape == (12, 4, 8, 8) and y.tolist() == [0] * 6 + [1] * 6
    assert not torch.equal(x, flipped)  # the flipped images' latents are cached beside them
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}

    again = runner.invoke(app, ["cache", *overrides(world, out)])
    assert again.exit_code == 0, again.output
    assert "complete already, reused (nothing encoded); 12 items" in again.output

    trained = runner.invoke(app, ["run", *overrides(world, out)])
    assert trained.exit_code == 0, (trained.output, trained.exception)
    assert (out / "checkpoints" / "step_0000004").is_dir()
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps  # nothing re-encoded or rewritten


def test_float16_cache_is_the_float32_cache_rounded(world, tmp_path):
    runs = {}
    for dtype in ("float32", "float16"):
        out = tmp_path / dtype
        result = runner.invoke(app, ["cache", *overrides(world, out), f"data.cache_dtype={dtype}"])
        assert result.exit_code == 0, (result.output, result.exception)
        runs[dtype] = latents(out / "latents")
    (x32, f32, y32), (x16, f16, y16) = runs["float32"], runs["float16"]
    assert torch.equal(x16, x32.half().float()) and torch.equal(f16, f32.half().float())
    assert torch.equal(y16, y32)
    assert not torch.equal(x16, x32)  # the rounding is there: float16 is not a no-op
    shard = "shard_00000.safetensors"  # 5 items x 2 views x 4x8x8 latents: 2 bytes a value instead of 4
    saved = (tmp_path / "float32" / "latents" / shard).stat().st_size - (tmp_path / "float16" / "latents" / shard).stat().st_size
    assert saved == 5 * 2 * 4 * 8 * 8 * 2

    # another dtype is another cache: it is not reused, and nothing is written into it
    cache = tmp_path / "float32" / "latents"
    before = tree(cache)
    clash = runner.invoke(app, ["cache", *overrides(world, tmp_path / "other"), f"data.latent_cache={cache}",
                                "data.cache_dtype=float16"])
    assert clash.exit_code == 2
    assert clash.stderr.strip().count("\n") == 0 and "differs in: dtype" in clash.stderr
    assert tree(cache) == before and not (tmp_path / "other").exists()


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")


@pytest.mark.parametrize("extra, expected", [
    (["data.latent_cache={world}/afile"], "data.latent_cache: '{world}/afile' is a file"),
    (["data.dataset.params.root={world}/nowhere"], "data.dataset.params.root: folder '{world}/nowhere'"),
    (["data.encoder.params.local_path={world}/nowhere"], "data.encoder.params.local_path: folder '{world}/nowhere'"),
    (["data.dataset.params.root={world}/nowhere", "data.encoder.params.local_path={world}/nowhere"],
     "2 problems: data.encoder.params.local_path"),
    (["data.dataset.params.image_size=15"], "data.encoder: the VAE needs an image size divisible by 2; got 15"),
    pytest.param(["train.device=cuda"], "train.device: 'cuda' requested", marks=NO_CUDA),
    (["data.cache_dtype=bfloat16"], "data.cache_dtype"),
    (["--nnodes", "two"], "--nnodes 'two'"),
])
def test_a_bad_cache_command_creates_nothing(world, tmp_path, extra, expected):
    extra = [e.replace("{world}", str(world)) for e in extra]
    fails_cleanly(world, tmp_path, ["cache", *overrides(world, tmp_path / "out"), *extra],
                  expected.replace("{world}", str(world)))


def test_an_encoder_without_a_cache_has_nothing_to_cache(world, tmp_path):
    from tests.conftest import TINY

    fails_cleanly(world, tmp_path, ["cache", *TINY, f"output_dir={tmp_path / 'out'}"],  # digits: pixel space
                  "data.encoder: 'identity' is not cached (its latents cost nothing to compute); there is nothing to cache")


def fails_cleanly(world, tmp_path, args, expected):
    before = tree(world)
    result = runner.invoke(app, args)
    err = result.stderr.strip()
    assert result.exit_code == 2, (result.output, result.exception)
    assert err.count("\n") == 0 and err.startswith("noisevalue: error: "), err
    assert expected in err, err
    assert list(tmp_path.iterdir()) == [] and tree(world) == before


def test_loader_workers_resolve_auto_per_device():
    assert AUTO_READERS_PER_GPU == 8
    assert loader_workers("auto", "cpu", 1, 64) == 0  # the CPU encodes: readers would compete with it
    assert loader_workers("auto", "cuda:0", 1, 64) == 8
    assert loader_workers("auto", torch.device("cuda", 3), 8, 64) == 8  # 64 CPUs / 8 GPUs
    assert loader_workers("auto", "cuda", 8, 32) == 4  # 32 CPUs shared by 8 processes
    assert loader_workers("auto", "cuda", 8, 12) == 1  # 12 // 8
    assert loader_workers("auto", "cuda", 16, 8) == 1  # at least one reader
    assert loader_workers("auto", "cuda", 1, None) == 1
    assert loader_workers(3, "cuda", 8, 8) == 3 and loader_workers(0, "cuda", 1, 64) == 0  # a number is kept
    assert loader_workers(2, "cpu", 1, 1) == 2


def test_num_workers_and_cache_dtype_in_the_recipe():
    from noisevalue.config import load_recipe
    from noisevalue.errors import ConfigError

    data = load_recipe("imagenet_cond").data
    assert (data.num_workers, data.cache_dtype) == ("auto", "float32")
    data = load_recipe("imagenet_cond", ["data.num_workers=6", "data.cache_dtype=float16"]).data
    assert (data.num_workers, data.cache_dtype) == (6, "float16")
    for bad, expected in (("data.num_workers=-1", "data.num_workers: Value error, expected auto or a number"),
                          ("data.num_workers=many", "data.num_workers"),
                          ("data.cache_dtype=bfloat16", "data.cache_dtype: Input should be 'float32' or 'float16'")):
        with pytest.raises(ConfigError, match=expected):
            load_recipe("imagenet_cond", [bad])


@pytest.mark.slow
def test_two_gloo_processes_build_the_cache_of_one(world, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name, n in (("one", 1), ("two", 2)):
        proc = subprocess.run(
            [sys.executable, "-m", "noisevalue.cli", "cache", *overrides(world, tmp_path / name),
             "--nproc-per-node", str(n)],
            capture_output=True, text=True, env=env, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "done; 12 items" in proc.stdout, proc.stdout
    assert "torch.distributed.run --nproc-per-node=2" in proc.stdout  # the second really ran two processes
    one, two = latents(tmp_path / "one" / "latents"), latents(tmp_path / "two" / "latents")
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
