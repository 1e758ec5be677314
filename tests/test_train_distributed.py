"""The trainer under torch.distributed: 2 gloo ranks resume like one uninterrupted run, resume a
1-process checkpoint, freeze with Learn&Drop; ``torchrun -m ldbfx train`` prints and writes on rank 0."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from test_distributed import _init, _spawn
from test_train import TINY, Interrupt, _params

from ldbfx.app.train import train

LDB = replace(TINY, policy="ldb", period=1, epochs=3)


def _figures(history):
    """A history without its wall times (they differ between ranks and runs)."""
    return [{k: v for k, v in row.items() if k not in ("epoch_time", "time_per_sample")} for row in history]


def _interrupted(config, path, epoch=1):
    def stop(row):
        if row["epoch"] == epoch:
            raise Interrupt

    try:
        train(replace(config, checkpoint=path), on_epoch=stop)
    except Interrupt:
        return
    raise AssertionError("the run was not interrupted")


def _trainer_rank(rank, world, init_file, out_dir):
    _init(rank, world, init_file)  # the trainer joins a process group that exists
    out = {}
    out["full"] = train(replace(LDB, checkpoint=os.path.join(out_dir, "full.pt"))).history
    _interrupted(LDB, os.path.join(out_dir, "part.pt"))
    part = os.path.join(out_dir, "part.pt")
    out["resumed"] = train(replace(LDB, checkpoint=part, resume=part)).history
    out["from_one_process"] = train(replace(LDB, resume=os.path.join(out_dir, "single.pt"))).history
    learn_drop = replace(TINY, policy="learn-and-drop", warmup_epochs=1, epochs=3)
    out["learn_drop"] = train(learn_drop).history
    torch.save(out, os.path.join(out_dir, f"trainer{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_resume_equals_uninterrupted_and_resume_a_one_process_checkpoint(tmp_path):
    single = train(LDB).history
    _interrupted(LDB, str(tmp_path / "single.pt"))
    _spawn(_trainer_rank, 2, str(tmp_path / "init"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"trainer{r}.pt", weights_only=False) for r in range(2)]
    # Every rank reports rank 0's figures: the global loss and rank 0's accuracy.
    assert _figures(ranks[0]["full"]) == _figures(ranks[1]["full"])
    full, resumed = ranks[0]["full"], ranks[0]["resumed"]
    assert [r["epoch"] for r in resumed] == [0, 1, 2]
    for a, b in zip(full, resumed):
        assert a["train_loss"] == b["train_loss"] and a["test_acc"] == b["test_acc"]
    a, b = _params(tmp_path / "full.pt"), _params(tmp_path / "part.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A checkpoint written by one process resumes on two: same global batches and masks.
    crossed = ranks[0]["from_one_process"]
    assert _figures(crossed[:2]) == _figures(single[:2])
    assert [r["batch_size"] for r in crossed] == [r["batch_size"] for r in single]
    assert crossed[2]["actual_drop_rate"] == single[2]["actual_drop_rate"] > 0
    assert crossed[2]["allreduce_bytes_skipped"] > 0 and "allreduce_bytes" not in crossed[1]  # epoch 1: one process
    # Learn&Drop changes DDP's parameter set when it freezes: the trainer wraps again.
    frozen = [r["frozen_layers"] for r in ranks[0]["learn_drop"]]
    assert frozen[-1] > 0 and _figures(ranks[0]["learn_drop"]) == _figures(ranks[1]["learn_drop"])


def test_torchrun_trains_and_resumes_printing_on_rank_zero(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "ldbfx", "train", "--batch-size", "16", "--max-steps", "2", "--period", "1",
               "--no-progress", "--out", str(out), "--checkpoint", str(out / "ckpt.pt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*command, "--epochs", "1"], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("epoch   0") == 1, first.stdout  # rank 0 only
    second = subprocess.run([*command, "--epochs", "2", "--resume", str(out / "ckpt.pt")],
                            capture_output=True, text=True, timeout=300, env=env, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "epoch   0" not in second.stdout and second.stdout.count("epoch   1") == 1, second.stdout
    history = json.loads((out / "log.json").read_text())["history"]
    assert [r["mode"] for r in history] == ["full", "drop"]
    assert history[1]["allreduce_bytes_skipped"] > 0
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.csv", "log.json"]


def test_global_batch_must_split_over_ranks():
    from ldbfx.errors import LdbfxError
    from ldbfx.app.train import _World

    with pytest.raises(LdbfxError, match="divisible by the number of ranks"):
        _World(rank=0, size=3).check_batch(16)
