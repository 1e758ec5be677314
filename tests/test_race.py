"""ldbfx.app.race: variants raced on the same batches, the schedule, FLOPs measured per kind of step."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldbfx.app.race import Curve, Task, Variant, _schedule, race, time_to_reach, value_at


def _residual_mlp():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return x + torch.relu(self.fc(x))

    return nn.Sequential(nn.Linear(8, 8), *[Block() for _ in range(6)], nn.Linear(8, 1))


def _task(seen=None, with_replacement=False):
    data = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    target = data.sum(1, keepdim=True)

    def batch(indices):
        if seen is not None:
            seen.append(indices.clone())
        return data[indices], target[indices]

    return Task(build=_residual_mlp, batch=batch, n_samples=64,
                loss=lambda m, b: F.mse_loss(m(b[0]), b[1]),
                evaluate=lambda m: F.mse_loss(m(data), target).item(), batch_size=8, epoch_steps=2,
                with_replacement=with_replacement)


@pytest.mark.parametrize("with_replacement", [False, True])
def test_every_variant_reads_the_same_sample_stream(with_replacement):
    """The baseline and a variant with twice the batch in DROP epochs read the same samples in
    the same order, the latter two batches' worth at a time."""
    read = {}
    for variant in (Variant("baseline", 1e-3), Variant("baseline", 1e-3, kappa=2.0, period=1)):
        calls = []
        task = _task(seen=calls, with_replacement=with_replacement)
        curve, = race(task, [variant], budget_s=0.3, evals=1, block=2)
        training = calls[:curve.steps]  # then come the counting steps of the measurement
        read[variant.kappa] = torch.cat(training)
        assert {len(i) for i in training} == ({8} if variant.kappa == 1 else {8, 16})
    shorter = min(len(read[1.0]), len(read[2.0]))
    assert shorter >= 16
    assert torch.equal(read[1.0][:shorter], read[2.0][:shorter])


def test_streams_are_prefixes_of_one_sequence():
    from ldbfx.app.race import _Stream

    a, b = _Stream(50, seed=3, with_replacement=False), _Stream(50, seed=3, with_replacement=False)
    whole = a.take(0, 120)
    assert torch.equal(torch.cat([b.take(0, 7), b.take(7, 13), b.take(20, 100)]), whole)
    assert sorted(whole[:50].tolist()) == list(range(50))  # passes without replacement
    c = _Stream(50, seed=3, with_replacement=True, chunk=16)
    d = _Stream(50, seed=3, with_replacement=True, chunk=16)
    assert torch.equal(c.take(0, 40), torch.cat([d.take(0, 5), d.take(5, 35)]))


def test_schedule_warms_up_then_decays_by_cosine_to_a_tenth():
    assert _schedule(0.0, 0.1) < 0.02
    assert _schedule(0.05, 0.1) == pytest.approx(0.51, abs=0.01)
    assert _schedule(0.1, 0.1) == pytest.approx(1.0)
    assert _schedule(0.55, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert _schedule(1.0, 0.1) == pytest.approx(0.1)


def test_time_to_reach_and_value_at_read_the_points():
    curve = Curve("x", Variant("baseline", 1.0), points=[
        {"time_s": 0.0, "value": 3.0}, {"time_s": 10.0, "value": 2.0}, {"time_s": 20.0, "value": 1.5}])
    assert time_to_reach(curve, 2.0) == 10.0
    assert time_to_reach(curve, 1.0) is None
    assert time_to_reach(curve, 2.5, higher_is_better=True) == 0.0
    assert value_at(curve, 15.0) == 2.0 and value_at(curve, 25.0) == 1.5


def test_race_measures_what_each_method_costs():
    """FLOPs and saved activations come from counting steps with each variant's own masks: DropBP
    costs less per step than the baseline, LayerDropBack's DROP steps (kappa 2) cost more than
    its full ones (twice the samples) but less than twice them (dropped dW)."""
    task = _task()
    variants = [Variant("baseline", 1e-3), Variant("dropbp", 1e-3, drop_rate=0.5),
                Variant("ldb", 1e-3, drop_rate=0.5, kappa=2.0, period=1)]
    curves = race(task, variants, budget_s=0.5, evals=2, block=2)
    base, dropbp, ldb = curves
    assert [c.name for c in curves] == ["baseline", "DropBP 0.5 (uniform)", "LayerDropBack 0.5 (kappa 2)"]
    assert set(base.flops_per_step) == {"full"} and set(dropbp.flops_per_step) == {"drop"}
    assert dropbp.flops_per_step["drop"] < base.flops_per_step["full"]
    assert ldb.flops_per_step["full"] == base.flops_per_step["full"]  # the same step, nothing dropped
    assert base.flops_per_step["full"] < ldb.flops_per_step["drop"] < 2 * base.flops_per_step["full"]
    assert ldb.saved_bytes["drop"] > ldb.saved_bytes["full"]  # twice the batch saves more activations
    for c in curves:
        assert c.train_time_s >= 0.5 and c.steps > 0
        assert c.points[0]["time_s"] == 0.0 and c.points[-1]["time_s"] == c.train_time_s
        assert [p["flops"] for p in c.points] == sorted(p["flops"] for p in c.points)
        assert c.points[-1]["steps"] == c.steps


def test_same_seed_same_start_and_the_untouched_model_after_measuring():
    """Every variant starts from the same weights (its first validation point agrees)."""
    curves = race(_task(), [Variant("baseline", 0.0), Variant("dropbp", 0.0, drop_rate=0.5)],
                  budget_s=0.2, evals=1)
    assert curves[0].points[0]["value"] == curves[1].points[0]["value"]
    # At LR 0 nothing moves (AdamW's decoupled decay is 0 too): the end equals the start.
    assert curves[0].final == curves[0].points[0]["value"]


def test_sensitivity_allocation_runs_once_inside_the_budget():
    curves = race(_task(), [Variant("dropbp", 1e-3, drop_rate=0.5, allocation="sensitivity")],
                  budget_s=0.4, evals=1, allocate_at=0.0)
    assert curves[0].steps > 0


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        Variant("layerdrop", 1e-3)


def test_lm_demo_writes_its_table_plot_and_figures(tmp_path):
    """The language-model demo on a tiny Llama: both runs, their measured costs, the verdict."""
    pytest.importorskip("transformers")
    import json

    from ldbfx.app.demo_lm import VERDICT, run_lm_demo

    lines = []
    figures = run_lm_demo(budget_s=1.0, size="tiny", out_dir=str(tmp_path), print_fn=lines.append)
    text = "\n".join(lines)
    assert "reached the baseline's final loss" in text and VERDICT in text
    base, dropbp = figures["runs"]["baseline"], figures["runs"]["DropBP 0.5 (uniform)"]
    assert dropbp["flops_per_step"]["drop"] < base["flops_per_step"]["full"]
    assert base["points"][0]["value"] == dropbp["points"][0]["value"]  # one initialisation
    assert figures["source"].startswith("stdlib source, python")
    assert json.loads((tmp_path / "lm-demo.json").read_text())["runs"].keys() == figures["runs"].keys()
    assert (tmp_path / "lm-demo.png").stat().st_size > 0


def test_lm_demo_refuses_the_vision_options(capsys):
    from ldbfx.app.cli import main

    assert main(["demo", "--task", "lm", "--model", "resnet50", "--epochs", "3"]) == 2
    assert "--task lm does not take --model, --epochs" in capsys.readouterr().err
    assert main(["demo", "--budget", "10"]) == 2  # the vision demo has no budget: refused, not ignored
    assert "--budget applies to --task lm" in capsys.readouterr().err
