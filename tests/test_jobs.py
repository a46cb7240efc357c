"""The one torchrun entry point (``noisevalue.jobs``) and the trainers' shared base."""

import tempfile
from pathlib import Path

import pytest

from noisevalue import jobs
from noisevalue.config import RESOLVED_RECIPE
from noisevalue.train.trainer import Trainer


def test_every_job_kind_starts_the_one_entry_point(tmp_path):
    for kind in ("run", "experiment", "sample", "cache"):
        args = jobs.launcher_args(kind, tmp_path, nproc_per_node=2)
        assert args[:2] == ["--nproc-per-node=2", "--nnodes=1"]
        assert args[args.index("-m"):] == ["-m", "noisevalue.jobs", kind, str(tmp_path)]
    assert jobs.launcher_args("run", tmp_path, resume=True, nproc_per_node=2)[-1] == "--resume"
    with pytest.raises(ValueError, match="unknown job kind 'train'"):
        jobs.launcher_args("train", tmp_path, nproc_per_node=2)


def test_a_rank_reports_a_bad_folder_in_one_line(tmp_path, capsys):
    assert jobs.main(["run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("noisevalue: error: ") and RESOLVED_RECIPE in err
    assert jobs.main(["sample", str(tmp_path)]) == 2
    assert "settings.json" in capsys.readouterr().err
    assert jobs.main(["cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and RESOLVED_RECIPE in err


def test_a_worker_leaves_with_its_exit_code_and_all_its_output(tmp_path):
    """A worker ends without interpreter teardown (``jobs.leave``); what it printed to pipes
    and logged to a file must still arrive, and its exit code must be kept."""
    import subprocess
    import sys

    log = tmp_path / "worker.log"
    script = ("import logging, sys\n"
              f"logging.basicConfig(filename={str(log)!r}, level=logging.INFO)\n"
              "logging.info('logged')\n"
              "print('out', end='')\n"
              "print('err', end='', file=sys.stderr)\n"
              "from noisevalue.jobs import leave\n"
              "leave(3)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out", "err")
    assert log.read_text().strip() == "INFO:root:logged"


def test_the_trainer_base_always_cleans_up(tmp_path):
    calls = []

    class Failing(Trainer):
        def setup(self):
            calls.append("setup")

        def train(self):
            calls.append("train")
            raise RuntimeError("diverged")

        def cleanup(self):
            calls.append("cleanup")

    class Done(Failing):
        def train(self):
            calls.append("train")

        def evaluate(self):
            return {"loss": 1.0}

    from noisevalue.config import load_recipe
    from noisevalue.distributed import init

    info = init("cpu")
    with pytest.raises(RuntimeError, match="diverged"):
        Failing(load_recipe(), tmp_path, info).run()
    assert calls == ["setup", "train", "cleanup"]
    calls.clear()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".latest.abc.tmp").write_text("x")  # left by a killed run
    assert Done(load_recipe(), tmp_path, info).run() == {"loss": 1.0}  # type: ignore[arg-type]
    assert not (tmp_path / "checkpoints" / ".latest.abc.tmp").exists()
    assert calls == ["setup", "train", "cleanup"]
    assert Trainer(None, tmp_path, None).ckpt_dir == tmp_path / "checkpoints"  # type: ignore[arg-type]


def test_a_workers_error_reaches_the_user_once(tmp_path, capfd):
    """Under torch.distributed.run the workers' one line comes back from the launcher once,
    with its exit code, instead of each rank's copy and a list of exit codes."""
    from omegaconf import OmegaConf

    from noisevalue import distributed
    from noisevalue.config import load_recipe_dict
    from noisevalue.errors import WorkerError
    from tests.conftest import TINY

    folder = tmp_path / "run"
    folder.mkdir()  # written as the CLI would, minus its own check of the batch
    data = load_recipe_dict(None, [*TINY, "train.global_batch_size=3", f"output_dir={folder}"])
    (folder / RESOLVED_RECIPE).write_text(OmegaConf.to_yaml(OmegaConf.create(data)))
    temp = Path(tempfile.gettempdir())
    reports = sorted(temp.glob("noisevalue-errors-*"))
    with pytest.raises(WorkerError) as err:
        distributed.launch(jobs.launcher_args("run", folder, nproc_per_node=2))
    assert err.value.exit_code == 2
    assert str(err.value) == "train.global_batch_size: 3 is not divisible by the 2 processes"
    captured = capfd.readouterr()
    assert "noisevalue: error" not in captured.err and "exitcode" not in captured.err, captured.err
    assert sorted(temp.glob("noisevalue-errors-*")) == reports  # the reports folder is gone
