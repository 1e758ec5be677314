"""The trainer end to end on a few tiny steps: every policy, resume, compile."""

import math
from dataclasses import replace

import pytest
import torch

import ldbfx
from ldbfx.app.train import TrainConfig, train

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


RESUMABLE = {
    "ldb": {"policy": "ldb", "period": 1},
    "cdb": {"policy": "cdb", "channel_rate": 0.5, "cdb_schedule": "milestones", "milestones": (1, 2)},
    "learn-and-drop": {"policy": "learn-and-drop", "warmup_epochs": 1, "cache": "memory"},
}


@pytest.mark.parametrize("policy", list(RESUMABLE))
def test_resume_equals_an_uninterrupted_run(tmp_path, policy):
    config = replace(TINY, epochs=4, checkpoint=str(tmp_path / "full.pt"), **RESUMABLE[policy])
    uninterrupted = train(config)
    interrupted = replace(config, checkpoint=str(tmp_path / "part.pt"))

    def stop(row):
        if row["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(interrupted, on_epoch=stop)
    resumed = train(replace(interrupted, resume=str(tmp_path / "part.pt")))
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3]
    for a, b in zip(uninterrupted.history, resumed.history):
        assert a["train_loss"] == b["train_loss"] and a["test_acc"] == b["test_acc"]
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
        TrainConfig(policy="layerdrop")


def test_bf16_autocast_training():
    result = train(replace(TINY, policy="ldb", amp="bf16", epochs=3, max_steps_per_epoch=2))
    assert [r["mode"] for r in result.history] == ["full", "full", "drop"]
    assert all(r["train_loss"] == r["train_loss"] for r in result.history)  # finite, not NaN


def test_channel_dropback_and_learn_and_drop_runs():
    cdb = train(replace(TINY, policy="cdb", channel_rate=0.5))
    assert [r["channel_rate"] for r in cdb.history] == [0.5] * 3
    assert all(0.2 < r["actual_channel_rate"] < 0.8 for r in cdb.history)
    assert [r["batch_size"] for r in cdb.history] == [16] * 3
    lnd = train(replace(TINY, policy="learn-and-drop", warmup_epochs=1, epochs=4))
    frozen = [r["frozen_layers"] for r in lnd.history]
    assert frozen[0] == 0 and frozen == sorted(frozen)  # never reinstated
    assert all(r["test_acc"] >= 0 for r in lnd.history)


def test_resume_refuses_other_settings_and_stretches_the_schedule_to_more_epochs(tmp_path):
    # A checkpoint continues its own run: another drop rate is refused, naming it. More epochs
    # are allowed, and the cosine then ends at the new last epoch; before, the loaded T_max
    # stayed 2 and the learning rate climbed back up after it.
    checkpoint = str(tmp_path / "ckpt.pt")
    first = replace(TINY, policy="ldb", epochs=2, max_steps_per_epoch=1, checkpoint=checkpoint)
    train(first)
    with pytest.raises(ldbfx.LdbfxError, match=r"--drop-rate 0\.5, the checkpoint's 0\.3"):
        train(replace(first, drop_rate=0.5, resume=checkpoint))
    longer = train(replace(first, epochs=4, resume=checkpoint, checkpoint=None))
    # LDB scales the learning rate by kappa in its DROP epochs (period 2: epoch 2)
    factors = [1.0, 1.0, first.kappa, 1.0]
    for epoch in (2, 3):
        want = first.lr * (1 + math.cos(math.pi * epoch / 4)) / 2 * factors[epoch]
        assert longer.history[epoch]["lr"] == pytest.approx(want)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no step ran
def test_skipped_fp16_steps_discard_their_skip_record(monkeypatch):
    # A loss scale far too large: every step's fp16 gradients overflow, GradScaler skips the
    # optimizer step and halves the scale. The trainer must then discard the record of what the
    # backward skipped (else the next step leaves those layers untouched too), and only then.
    import ldbfx.app.train as trainer

    calls = []

    def discard(gm):
        calls.append(bool(gm.ldbfx_state.skipped))
        ldbfx.discard_skipped(gm)

    scalers = []

    class HugeScale(torch.amp.GradScaler):
        def __init__(self, device, enabled):
            super().__init__(device, init_scale=2.0 ** 40, enabled=enabled)
            scalers.append(self)

    monkeypatch.setattr(trainer, "discard_skipped", discard)
    monkeypatch.setattr(trainer.torch.amp, "GradScaler", HugeScale)
    train(replace(TINY, policy="ldb", period=1, kappa=1, amp="fp16", epochs=2, max_steps_per_epoch=4))
    skipped = round(math.log2(2.0 ** 40 / scalers[0].get_scale()))
    assert skipped > 0 and len(calls) == skipped
    assert any(calls)  # some of them had dropped layers to forget


def test_fp16_trains_with_a_grad_scaler(tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    result = train(replace(TINY, policy="ldb", period=1, amp="fp16", epochs=2, checkpoint=str(checkpoint)))
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in result.history)
    state = torch.load(checkpoint, weights_only=False)
    assert state["scaler"]["scale"] > 0  # saved for resume
    resumed = train(replace(TINY, policy="ldb", period=1, amp="fp16", epochs=3, resume=str(checkpoint)))
    assert len(resumed.history) == 3
