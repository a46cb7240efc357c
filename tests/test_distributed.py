"""The collectives a shared evaluation uses, on 3 gloo processes: blocks streamed to rank 0
in block order, rows gathered from uneven shards, and an evaluator that does not join the
process group fed every image on rank 0 (its metrics those of one process)."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def join(rank: int, world: int, port: int):
    from noisevalue import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    return distributed.init("cpu", timeout_s=120)


def block(b: int) -> torch.Tensor:
    return torch.full((b % 3 + 1, 2), float(b))


def collectives(rank: int, world: int, port: int, out: str) -> None:
    from noisevalue.distributed import cleanup, gather_rows, stream_to_main

    info = join(rank, world, port)
    owners = [b % world for b in range(7)]
    mine = (block(b) for b in range(7) if owners[b] == rank)
    received = list(stream_to_main(owners, mine, info))
    rows = gather_rows(torch.arange(rank + 1, dtype=torch.float64) + 10 * rank, info)
    if info.is_main:
        torch.save({"received": received, "rows": rows}, out)
    cleanup(info)


def test_blocks_stream_to_rank_0_in_order_and_uneven_rows_gather(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(collectives, args=(3, free_port(), str(out)), nprocs=3, join=True)
    got = torch.load(out)
    assert [b.tolist() for b in got["received"]] == [block(b).tolist() for b in range(7)]
    assert got["rows"].tolist() == [0.0, 10.0, 11.0, 20.0, 21.0, 22.0]


class MeanGap:
    """A plugin-style evaluator that keeps no statistics and does not join a process group:
    the mean pixel of the generated images against the reference's, in float64."""

    def prepare(self, reference):
        self.ref = torch.cat([b.flatten() for b in reference]).double().mean()

    def evaluate(self, generated):
        return {"mean_gap": float(torch.cat([b.flatten() for b in generated]).double().mean() - self.ref)}

    def reference_key(self):
        return None


def evaluation_metrics(info) -> dict:
    from noisevalue import registry
    from noisevalue.config import load_recipe
    from noisevalue.data.encoders import IdentityEncoder
    from noisevalue.diffusion import Diffusion
    from noisevalue.train.evaluate import Evaluation

    recipe = load_recipe("digits", ["eval.num_samples=20", "sample.batch_size=8", "sample.num_steps=2",
                                    "eval.loss_draws=0", "eval.baselines=false"])
    torch.manual_seed(0)
    model = registry.build("backbone", registry.Named("DiT-Tiny/2", {}), where="model").eval()
    evaluation = Evaluation(recipe, [MeanGap()], info, IdentityEncoder(), (1, 8, 8), 10, Diffusion())
    return evaluation.metrics(model)


def plugin_evaluation(rank: int, world: int, port: int, out: str) -> None:
    from noisevalue.distributed import cleanup

    info = join(rank, world, port)
    metrics = evaluation_metrics(info)
    if info.is_main:
        torch.save(metrics, out)
    else:
        assert metrics == {}
    cleanup(info)


def test_an_evaluator_that_does_not_join_gets_every_image_on_rank_0(tmp_path, monkeypatch):
    from noisevalue.distributed import DistInfo

    monkeypatch.setenv("NOISEVALUE_CACHE", str(tmp_path))
    one = evaluation_metrics(DistInfo())
    out = tmp_path / "rank0.pt"
    mp.spawn(plugin_evaluation, args=(3, free_port(), str(out)), nprocs=3, join=True)  # blocks of 8, 8, 4
    assert torch.load(out) == pytest.approx(one, rel=1e-12) and one["mean_gap"] != 0
