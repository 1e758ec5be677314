"""The trainer end to end on a few tiny steps: both policies, resume, compile."""

from dataclasses import replace

import pytest
import torch

from ldbfx.train import TrainConfig, train

TINY = TrainConfig(data="digits", model="resnet18", image_size=32, epochs=3, batch_size=16,
                   max_steps_per_epoch=3, progress=False, lr=0.02)


def test_baseline_and_ldb_runs():
    base = train(replace(TINY, policy="none"))
    ldb = train(replace(TINY, policy="ldb"))
    assert [r["mode"] for r in base.history] == ["full"] * 3
    assert [r["mode"] for r in ldb.history] == ["full", "full", "drop"]  # period 2: epoch 2 drops
    assert [r["batch_size"] for r in ldb.history] == [16, 16, 32]  # kappa = 2
    assert ldb.history[2]["lr"] == pytest.approx(2 * base.history[2]["lr"])
    assert 0 < ldb.history[2]["bwd_flops_skipped"] < 0.5
    assert all(0 <= r["test_acc"] <= 1 for r in ldb.history)
    assert ldb.layers_eligible == ldb.layers_total - 5


class Interrupt(Exception):
    pass


def _params(path):
    return torch.load(path, weights_only=False)["model"]


def test_resume_equals_an_uninterrupted_run(tmp_path):
    config = replace(TINY, policy="ldb", epochs=4, period=1, checkpoint=str(tmp_path / "full.pt"))
    train(config)
    interrupted = replace(config, checkpoint=str(tmp_path / "part.pt"))

    def stop(row):
        if row["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(interrupted, on_epoch=stop)
    resumed = train(replace(interrupted, resume=str(tmp_path / "part.pt")))
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3]
    full, part = _params(tmp_path / "full.pt"), _params(tmp_path / "part.pt")
    assert full.keys() == part.keys()
    for key in full:
        assert torch.equal(full[key], part[key]), key


@pytest.mark.slow
def test_compiled_training():
    torch._dynamo.reset()
    result = train(replace(TINY, policy="ldb", compile=True, epochs=3, max_steps_per_epoch=2))
    assert [r["mode"] for r in result.history] == ["full", "full", "drop"]
    torch._dynamo.reset()


def test_invalid_config():
    with pytest.raises(ValueError, match="policy must be"):
        TrainConfig(policy="cdb")


def test_bf16_autocast_training():
    result = train(replace(TINY, policy="ldb", amp="bf16", epochs=3, max_steps_per_epoch=2))
    assert [r["mode"] for r in result.history] == ["full", "full", "drop"]
    assert all(r["train_loss"] == r["train_loss"] for r in result.history)  # finite, not NaN
