"""Stage folders: settings checks, kept trajectories, and the plain scalar log."""

import json
from pathlib import Path

import pytest
import torch

from noisevalue import checkpoint
from noisevalue.config import load_recipe
from noisevalue.errors import ConfigError
from noisevalue.experiments import stages
from noisevalue.train.run_log import RunLog, read_scalar
from tests.conftest import TINY


def stage(tmp_path, *extra):
    recipe = load_recipe(None, [*TINY, f"output_dir={tmp_path}", *extra])
    return stages.stage_recipe(recipe, tmp_path / "pretrain", workflow="pretrain")


def test_a_stage_refuses_other_settings_but_not_other_speeds(tmp_path):
    first = stage(tmp_path)
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / stages.STAGE_SETTINGS).write_text(json.dumps(stages.stage_settings(first)))
    stages.check_stage_settings(stage(tmp_path, "train.threads=2", "train.log_every=7", "meta.outer_steps=9"))
    with pytest.raises(ConfigError, match=r"ran with train\.lr=0\.001, the recipe now says 0\.5"):
        stages.check_stage_settings(stage(tmp_path, "train.lr=0.5"))
    with pytest.raises(ConfigError, match=r"train\.selector\.params"):
        stages.check_stage_settings(stage(tmp_path, "train.selector={name: random, params: {k: 2}}"))


def test_a_run_folder_named_another_way_reuses_its_stages(tmp_path, monkeypatch):
    """A stage records the folders it starts from as written; the same folder named
    relatively, absolutely or through a link is the same setting, another folder is not."""
    (tmp_path / "run" / "pretrain").mkdir(parents=True)
    (tmp_path / "other" / "pretrain").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "run")
    monkeypatch.chdir(tmp_path)

    def rater_stage(run: str):
        recipe = load_recipe(None, [*TINY, f"output_dir={run}"])
        return stages.stage_recipe(recipe, Path(run) / "rater", workflow="meta_train")

    def with_pretrained(run: str):
        recipe = rater_stage(run)
        return stages.replace(recipe, meta=stages.replace(recipe.meta, pretrained=f"{run}/pretrain"))

    first = with_pretrained("run")
    (tmp_path / "run" / "rater").mkdir()
    (tmp_path / "run" / "rater" / stages.STAGE_SETTINGS).write_text(json.dumps(stages.stage_settings(first)))
    assert stages.stage_settings(first)["meta.pretrained"] == "run/pretrain"
    for spelling in (str(tmp_path / "run"), "link", "./run"):
        again = with_pretrained(spelling)
        stages.check_stage_settings(stages.replace(again, output_dir="run/rater"))
    moved = stages.replace(with_pretrained("other"), output_dir="run/rater")
    with pytest.raises(ConfigError, match=r"meta\.pretrained='run/pretrain'"):
        stages.check_stage_settings(moved)


def test_seeded_dir_names(tmp_path):
    recipe = stage(tmp_path)
    assert stages.seeded_dir(tmp_path / "rater", 0, recipe) == tmp_path / "rater"
    assert stages.seeded_dir(tmp_path / "rater", 3, recipe) == tmp_path / "rater-seed3"


def test_keep_every_retains_a_trajectory(tmp_path):
    for step in range(1, 9):
        checkpoint.save_checkpoint(tmp_path, {"m": {"w": torch.zeros(1)}}, checkpoint.CheckpointMeta(step=step),
                                  keep=2, keep_every=3)
    kept = [checkpoint.checkpoint_step(p) for p in checkpoint.list_checkpoints(tmp_path)]
    assert kept == [3, 6, 7, 8]


def test_scalar_log_drops_lines_past_a_resumed_step(tmp_path):
    log = RunLog(tmp_path, enabled=True)
    for step in (10, 20, 30):
        log.scalars({"train/loss": step / 10}, step)
    log.close()
    with (tmp_path / "scalars.jsonl").open("a") as f:
        f.write('{"step": 40, "train/lo')  # cut short by a crash
    resumed = RunLog(tmp_path, enabled=True, start_step=20)
    resumed.scalars({"train/loss": 9.0}, 30)
    resumed.close()
    assert read_scalar(tmp_path, "train/loss") == ([10, 20, 30], [1.0, 2.0, 9.0])
    RunLog(tmp_path, enabled=True).close()  # a fresh run starts a fresh log
    assert read_scalar(tmp_path, "train/loss") == ([], [])


def test_a_selectors_k_is_named_once_by_its_component():
    from noisevalue.config import Component
    from noisevalue.experiments.stages import candidates, needed_rater, with_rater

    assert candidates(Component(name="rater", params={"k": 3})) == 3
    assert candidates(Component(name="max_norm")) == 4  # the factory's default
    assert candidates(Component(name="random")) == 1
    assert needed_rater(Component(name="rater")) == "trained"
    assert needed_rater(Component(name="random_rater")) == "untrained"
    assert needed_rater(Component(name="rater", params={"checkpoint": "x"})) is None  # given: kept
    assert needed_rater(Component(name="max_norm")) is None
    raters = {"trained": Path("a"), "untrained": Path("b")}
    assert with_rater(Component(name="random_rater", params={"k": 2}), raters).params == {"k": 2, "checkpoint": "b"}
    assert with_rater(Component(name="min_norm"), raters) == Component(name="min_norm")


def test_stage_recipes_are_typed_copies_equal_to_a_reparse(tmp_path):
    from noisevalue.config import Component, parse_recipe

    recipe = load_recipe(None, [*TINY, f"output_dir={tmp_path}"])
    selector = Component(name="random", params={"k": 2})
    stage_ = stages.replace(
        stages.stage_recipe(recipe, tmp_path / "select" / "x", workflow="pretrain", seed=3),
        train=stages.replace(recipe.train, steps=9, init_from="elsewhere", selector=selector),
    )
    assert isinstance(stage_.train.selector, Component) and stage_.train.selector == selector
    assert (stage_.seed, stage_.train.steps, stage_.output_dir) == (3, 9, str(tmp_path / "select" / "x"))
    assert stage_.data.latent_cache == str(tmp_path / "latents")  # the recipe's shared cache
    assert recipe.train.steps != 9 and recipe.seed == 0  # the recipe itself is untouched
    # the copy is what parsing its dump gives: the same stage settings, so no stage drifts
    reparsed = parse_recipe(stage_.model_dump(mode="json"))
    assert stages.stage_settings(reparsed) == stages.stage_settings(stage_)
    with pytest.raises(TypeError, match="TrainConfig has no field 'stpes'"):
        stages.replace(recipe.train, stpes=9)


def test_a_setting_added_later_at_its_default_keeps_old_stages_reusable(tmp_path):
    first = stage(tmp_path)
    (tmp_path / "pretrain").mkdir()
    old = stages.stage_settings(first)
    for key in ("sample.nag_scale", "train.timestep_sampler.name", "train.timestep_sampler.params", "data.cache_dtype"):
        old.pop(key)  # as written before these settings existed
    (tmp_path / "pretrain" / stages.STAGE_SETTINGS).write_text(json.dumps(old))
    stages.check_stage_settings(stage(tmp_path))
    with pytest.raises(ConfigError, match=r"ran with sample\.nag_scale=None, the recipe now says 0\.5"):
        stages.check_stage_settings(stage(tmp_path, "sample.nag_scale=0.5"))
    with pytest.raises(ConfigError, match=r"ran with data\.cache_dtype=None, the recipe now says 'float16'"):
        stages.check_stage_settings(stage(tmp_path, "data.cache_dtype=float16"))  # part of the data: not ignored
