"""Checkpoints: bit-exact round trips, atomic writes, clear errors for bad files."""

import json

import pytest
import torch

from noisevalue import checkpoint as ckpt
from noisevalue.errors import CheckpointError


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))


def trained_optimizer(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    return opt


def test_round_trip_is_bit_exact(tmp_path):
    model = small_model()
    opt = trained_optimizer(model)
    tensors, opt_meta = ckpt.optimizer_to_flat(opt.state_dict())
    path = ckpt.save_checkpoint(tmp_path, {"model": model.state_dict(), "optimizer": tensors},
                                ckpt.CheckpointMeta(step=3, optimizer=opt_meta))
    assert path.name == "step_0000003" and (tmp_path / "latest").read_text().strip() == path.name

    fresh = small_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    ckpt.load_state_into(fresh, ckpt.load_tensors(path, "model"), "test")
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), k

    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1.0)
    meta = ckpt.read_meta(path)
    opt2.load_state_dict(ckpt.optimizer_from_flat(ckpt.load_tensors(path, "optimizer"), meta.optimizer))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for key in s1["state"][i]:
            assert torch.equal(s1["state"][i][key], s2["state"][i][key])


def test_keep_last_and_latest(tmp_path):
    m = small_model()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, {"model": m.state_dict()}, ckpt.CheckpointMeta(step=step), keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    assert ckpt.resolve_checkpoint(tmp_path).name == "step_0000003"


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    import safetensors.torch

    m = small_model()
    good = ckpt.save_checkpoint(tmp_path, {"model": m.state_dict()}, ckpt.CheckpointMeta(step=1))
    before = (good / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, {"model": m.state_dict()}, ckpt.CheckpointMeta(step=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000001"]
    assert (good / "model.safetensors").read_bytes() == before
    assert ckpt.latest_checkpoint(tmp_path) == good


def test_truncated_and_corrupt_files_are_clear_errors(tmp_path):
    m = small_model()
    path = ckpt.save_checkpoint(tmp_path, {"model": m.state_dict()}, ckpt.CheckpointMeta(step=1))
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        ckpt.load_tensors(path, "model")
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json is corrupt"):
        ckpt.read_meta(path)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        ckpt.resolve_checkpoint(tmp_path / "elsewhere")


def test_mismatched_model_is_named(tmp_path):
    m = small_model()
    path = ckpt.save_checkpoint(tmp_path, {"model": m.state_dict()}, ckpt.CheckpointMeta(step=1, x=1))
    other = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
    with pytest.raises(CheckpointError, match=r"'0.bias' has shape \(8,\) in the checkpoint but \(16,\)"):
        ckpt.load_state_into(other, ckpt.load_tensors(path, "model"), str(path))
    assert json.loads((path / "meta.json").read_text())["x"] == 1


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        ckpt.atomic_write_text(tmp_path / "a.txt", "x")
        step = ckpt.save_checkpoint(tmp_path / "c", {"m": {"w": torch.zeros(1)}}, ckpt.CheckpointMeta(step=1))
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0o600
    assert step.stat().st_mode & 0o777 == 0o755
    assert {f.name: f.stat().st_mode & 0o777 for f in step.iterdir()} == {"m.safetensors": 0o644, "meta.json": 0o644}


def test_meta_json_is_typed_and_round_trips(tmp_path):
    meta = ckpt.CheckpointMeta(step=5, backbone={"name": "DiT-Tiny/2", "params": {"depth": 2}},
                               latent_shape=(1, 8, 8), num_classes=10, diffusion={"num_timesteps": 1000})
    path = ckpt.save_checkpoint(tmp_path, {"model": {"w": torch.zeros(1)}}, meta)
    back = ckpt.read_meta(path)
    assert back == meta and back.is_diffusion and back.backbone.params == {"depth": 2}
    assert json.loads((path / "meta.json").read_text())["latent_shape"] == [1, 8, 8]
    assert ckpt.require_diffusion(path, "here") == meta

    rater = ckpt.save_checkpoint(tmp_path / "r", {"rater": {"w": torch.zeros(1)}},
                                 ckpt.CheckpointMeta(step=1, rater={"name": "dual_stream_tiny"}))
    with pytest.raises(CheckpointError, match=r"noisevalue sample: '.*' is a rater checkpoint"):
        ckpt.require_diffusion(rater, "noisevalue sample")

    (path / "meta.json").write_text(json.dumps({"step": 5, "latent_shape": "wide"}))
    with pytest.raises(CheckpointError, match=r"meta.json 'latent_shape': Input should be a valid tuple"):
        ckpt.read_meta(path)


def test_pruning_retires_whole_folders_and_leftovers_are_removed(tmp_path, monkeypatch):
    m = small_model()
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, {"model": m.state_dict()}, ckpt.CheckpointMeta(step=step), keep=2)
    seen = []
    real = ckpt.shutil.rmtree

    def watching(path, **kw):  # what a listing sees while a pruned folder is being deleted
        seen.append([p.name for p in ckpt.list_checkpoints(tmp_path)])
        real(path, **kw)

    monkeypatch.setattr(ckpt.shutil, "rmtree", watching)
    ckpt.save_checkpoint(tmp_path, {"model": m.state_dict()}, ckpt.CheckpointMeta(step=3), keep=2)
    assert seen and seen[-1] == ["step_0000002", "step_0000003"]  # never the half-deleted step 1
    monkeypatch.undo()
    (tmp_path / ".step_0000009.abc.tmp").mkdir()
    (tmp_path / ".latest.xyz.tmp").write_text("step_0000009\n")
    (tmp_path / ".step_0000001.retired").mkdir()
    removed = ckpt.remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == [".latest.xyz.tmp", ".step_0000001.retired", ".step_0000009.abc.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000002", "step_0000003"]
