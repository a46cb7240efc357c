"""The example rater and stochastic selector, used as a third party uses them: found through
their entry points, meta-trained and applied by the protocol, resumed exactly."""

import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from noisevalue import registry
from noisevalue.cli import app
from noisevalue.selectors import RaterSelector

runner = CliRunner()

TINY = [
    "train.steps=4", "train.global_batch_size=8", "train.ckpt_every=2", "train.log_every=1",
    "train.threads=1", "eval.evaluators=[]", "eval.loss_draws=2", "eval.loss_images=24",
    "sample.num_steps=2", "sample.per_class=1",
]
RATER = ["~rater.params", "rater.name=example-conv", "rater.params.width=8"]
META = [
    *RATER, "meta.inner_steps=2", "meta.groups=4", "meta.group_size=3", "meta.val_batch_size=8",
    "meta.inner_lr=0.01", "meta.log_every=1", "meta.ckpt_every=2", "meta.outer_steps=2",
]


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_found_through_the_entry_points():
    found = {(e.kind, e.name): e.distribution for e in registry.entries()}
    assert found[("rater", "example-conv")] == "noisevalue-example-selection"
    assert found[("selector", "example-softmax")] == "noisevalue-example-selection"


def test_rater_scores_one_number_per_candidate_and_rejects_bad_widths():
    rater = registry.create("rater", "example-conv", input_size=8, in_channels=1, num_classes=10, width=4)
    noise, x0 = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
    scores = rater(noise, torch.tensor([0, 10, 200, 500, 999]), x0, torch.tensor([0, 1, 2, 3, 10]))
    assert scores.shape == (5,)
    assert len(set(scores.tolist())) == 5  # noise, time and class all reach the score
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        registry.create("rater", "example-conv", width=0)


def _selector(temperature, k=4):
    torch.manual_seed(0)
    rater = registry.create("rater", "example-conv", input_size=8, in_channels=1, num_classes=10, width=4)
    return registry.create("selector", "example-softmax", k=k, temperature=temperature, rater=rater)


def _batch(n, k=4):
    torch.manual_seed(1)
    x0 = torch.randn(1, 1, 8, 8).expand(n, -1, -1, -1)
    candidates = torch.randn(1, k, 1, 8, 8).expand(n, -1, -1, -1, -1)
    return x0, torch.full((n,), 3), torch.full((n,), 400), candidates


def test_draws_follow_the_softmax_of_the_scores():
    """4,000 draws for one group: each candidate's frequency is within 4.5 binomial standard
    deviations of softmax(score / T)."""
    selector = _selector(temperature=0.05)
    x0, y, t, candidates = _batch(4000)
    probs = selector.probabilities(x0[:1], y[:1], t[:1], candidates[:1])[0]
    assert probs.max() < 0.95 and probs.min() > 0.01  # a test of sampling, not of argmax
    picks = selector.select(x0, y, t, candidates, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(picks, minlength=4).double() / len(picks)
    sd = (probs * (1 - probs) / len(picks)).sqrt()
    assert ((freq - probs).abs() < 4.5 * sd).all(), (freq, probs)


def test_the_generator_decides_every_draw():
    selector = _selector(temperature=0.05)
    x0, y, t, candidates = _batch(200)
    first = selector.select(x0, y, t, candidates, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global RNG plays no part
    again = selector.select(x0, y, t, candidates, generator=torch.Generator().manual_seed(7))
    other = selector.select(x0, y, t, candidates, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_a_cold_softmax_is_the_top_1_rater_selector():
    selector = _selector(temperature=1e-6)
    x0, y, t, candidates = _batch(50)
    top1 = RaterSelector(k=4, rater=selector.rater).select(x0, y, t, candidates)
    assert torch.equal(selector.select(x0, y, t, candidates, generator=torch.Generator()), top1)


@pytest.mark.parametrize("overrides, expected", [
    (["select.methods.soft={name: example-softmax, params: {temperature: 0}}"],
     "select.methods.soft (example-softmax): temperature must be > 0, got 0"),
    (["~rater.params", "rater.name=example-conv", "rater.params.width=0"],
     "rater (example-conv): width must be an integer >= 1, got 0"),
])
def test_bad_values_are_one_line_before_any_training(tmp_path, overrides, expected):
    out = tmp_path / "run"
    for command in (["recipe", "validate"], ["run"]):
        result = runner.invoke(app, [*command, "digits", *overrides, f"output_dir={out}"])
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines() == [f"noisevalue: error: {expected}"]
    assert not out.exists()  # nothing created


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    """Both seeds of a tiny protocol with the plugin rater and the plugin selector."""
    root = tmp_path_factory.mktemp("protocol") / "run"
    invoke("run", *TINY, *META, "workflow=protocol", f"output_dir={root}", "select.steps=4",
           "select.eval_every=4", "select.seeds=[0,1]", "~select.methods",
           "select.methods={vanilla: {name: random, params: {k: 1}}, "
           "softmax: {name: example-softmax, params: {k: 3, temperature: 0.5}}}")
    return root


def test_protocol_gives_each_seed_its_own_trained_rater(protocol_run):
    root = protocol_run
    rows = list(csv.DictReader((root / "comparison.csv").open()))
    assert {r["run"] for r in rows} == {"vanilla", "softmax"}
    assert {r["seed"] for r in rows} == {"0", "1", "mean"}  # per seed, and their mean with its interval
    for stage, rater in (("softmax", "rater"), ("softmax-seed1", "rater-seed1")):
        params = json.loads((root / "select" / stage / "stage.json").read_text())["train.selector.params"]
        assert params["checkpoint"] == str(root / rater)
    meta = json.loads((root / "rater-seed1" / "checkpoints" / "step_0000002" / "meta.json").read_text())
    assert meta["rater"]["name"] == "example-conv"
    a = load_file(str(root / "rater" / "checkpoints" / "step_0000002" / "rater.safetensors"))
    b = load_file(str(root / "rater-seed1" / "checkpoints" / "step_0000002" / "rater.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two seeds, two raters


def test_stochastic_selection_resumes_exactly(protocol_run, tmp_path):
    """4 selection steps in one go equal 2 + 2 resumed ones, bit for bit."""
    selector = f"train.selector={{name: example-softmax, params: {{k: 3, checkpoint: {protocol_run / 'rater'}}}}}"
    common = [*TINY, *RATER, "workflow=pretrain", f"train.init_from={protocol_run / 'pretrain'}", selector]
    full, split = tmp_path / "full", tmp_path / "split"
    invoke("run", *common, "train.steps=8", f"output_dir={full}")
    invoke("run", *common, "train.steps=6", f"output_dir={split}")
    invoke("run", *common, "train.steps=8", f"output_dir={split}", "--resume")
    a = load_file(str(full / "checkpoints" / "step_0000008" / "model.safetensors"))
    b = load_file(str(split / "checkpoints" / "step_0000008" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(str(protocol_run / "pretrain" / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert not math.isclose(sum((a[k] - start[k]).abs().sum().item() for k in a), 0.0)



def test_ablate_hands_each_variant_its_rater_through_the_plugin_selector(tmp_path):
    """`ablate.selector` names the plugin selector: the full row gets the stage-(ii) rater,
    the ablated row its own variant's rater, and the table is labelled with the plugin's k."""
    root = tmp_path / "run"
    rater = "rater={name: dual_stream_tiny, params: {hidden_size: 16, depth: 1, num_heads: 2}}"
    invoke("ablate", *TINY, *META[len(RATER):], rater, f"output_dir={root}", "select.steps=2",
           "select.eval_every=2", "--remove", "label",
           "ablate.selector={name: example-softmax, params: {k: 3, temperature: 0.5}}")

    def selector(stage):
        settings = json.loads((stage / "stage.json").read_text())
        return settings["train.selector.name"], settings["train.selector.params"]

    assert selector(root / "ablate" / "full" / "select") == (
        "example-softmax", {"k": 3, "temperature": 0.5, "checkpoint": str(root / "rater")})
    assert selector(root / "ablate" / "no-label" / "select") == (
        "example-softmax", {"k": 3, "temperature": 0.5, "checkpoint": str(root / "ablate" / "no-label" / "rater")})
    assert "full rater (k=3)" in (root / "ablate" / "ablation.md").read_text()
    refused = runner.invoke(app, ["recipe", "validate", "digits", "ablate.selector={name: max_norm, params: {k: 3}}"])
    assert refused.exit_code == 2 and 'does not declare needs_rater = "trained"' in refused.output
