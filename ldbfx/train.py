"""The trainer behind ``ldbfx train`` and ``ldbfx demo``: baseline or LayerDropBack, resumable.

One plain loop, written so every number it reports is measured: per-epoch wall time (training
only), time per sample, accuracy on the held-out split, and the share of backward FLOPs skipped
(``FlopCounterMode`` on one batch, per layer, summed over the layers actually dropped).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import data as datasets
from .inspect import weight_grad_flops
from .layers import layers as _layers
from .policies import ChannelDropBack, LayerDropBack, LearnAndDrop
from .rewrite import transform

__all__ = ["TrainConfig", "build_model", "train", "POLICIES"]

POLICIES = ("none", "ldb", "cdb", "learn-and-drop")


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in checkpoints and logs)."""

    data: str = "digits"
    data_dir: str | None = None
    model: str = "resnet18"
    image_size: int = 32
    policy: str = "ldb"  # "none" | "ldb" | "cdb" | "learn-and-drop"
    drop_rate: float = 0.3
    period: int = 2
    kappa: float = 2.0
    lr_scale: float | str | None = None
    resample: str = "step"
    # ChannelDropBack
    layer_rate: float = 1.0
    channel_rate: float = 0.5
    cdb_schedule: str = "fixed"
    milestones: tuple[int, ...] = ()
    cdb_dim: int = 0
    cdb_selection: str = "one"
    # Learn&Drop
    warmup_epochs: int = 2
    cache: str | None = None  # None | "memory" | "disk"
    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    compile: bool = False
    amp: str | None = None  # "bf16" | "fp16"
    device: str = "cpu"
    seed: int = 0
    out_dir: str | None = None  # writes log.json / log.csv here
    checkpoint: str | None = None  # saved after every epoch
    resume: str | None = None
    progress: bool = True
    max_steps_per_epoch: int | None = None  # for smoke tests

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        self.milestones = tuple(self.milestones)
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")


def build_model(name: str, num_classes: int) -> torch.nn.Module:
    """A torchvision model by name, else a timm model (``timm.create_model``)."""
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(name, num_classes=num_classes)
    import timm

    if name in timm.list_models():
        return timm.create_model(name, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}: not a torchvision classification model nor a timm model")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _autocast(config: TrainConfig):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
    return torch.autocast(config.device.split(":")[0], dtype=dtype, enabled=dtype is not None)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class RunResult:
    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    layers_total: int = 0
    layers_eligible: int = 0

    @property
    def train_time(self) -> float:
        return sum(row["epoch_time"] for row in self.history)

    @property
    def final_accuracy(self) -> float:
        return self.history[-1]["test_acc"]


def evaluate(model: torch.nn.Module, dataset, config: TrainConfig) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad(), _autocast(config):
        for x, y in DataLoader(dataset, batch_size=256):
            x, y = x.to(config.device), y.to(config.device)
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    model.train()
    return correct / total


def train(config: TrainConfig, *, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Trains ``config.model`` on ``config.data`` with or without LayerDropBack.

    Returns a :class:`RunResult` with one history row per epoch: mode (``full``/``drop``), batch
    size, LR, train loss, test accuracy, epoch time, time per sample, and the drop statistics.
    """
    _seed_all(config.seed)
    splits = datasets.load(config.data, config.data_dir, image_size=config.image_size, seed=config.seed)
    model = build_model(config.model, splits.num_classes).to(config.device)
    net = transform(model) if config.policy != "none" else model
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    policy = None
    flops = None
    result = RunResult(asdict(config))
    if config.policy == "ldb":
        policy = LayerDropBack(net, optimizer, drop_rate=config.drop_rate, period=config.period,
                               kappa=config.kappa, lr_scale=config.lr_scale, resample=config.resample,
                               seed=config.seed)
        probe = torch.stack([splits.train[i][0] for i in range(min(8, len(splits.train)))])
        flops = weight_grad_flops(net, probe.to(config.device))
    elif config.policy == "cdb":
        policy = ChannelDropBack(net, optimizer, layer_rate=config.layer_rate, channel_rate=config.channel_rate,
                                 schedule=config.cdb_schedule, milestones=config.milestones, dim=config.cdb_dim,
                                 selection=config.cdb_selection, seed=config.seed)
    elif config.policy == "learn-and-drop":
        policy = LearnAndDrop(net, optimizer, warmup_epochs=config.warmup_epochs, cache=config.cache,
                              num_samples=len(splits.train), compile_head=config.compile)
    if policy is not None:
        layers = _layers(net)
        result.layers_total, result.layers_eligible = len(layers), sum(l.eligible for l in layers)
    start_epoch = 0
    if config.resume:
        state = torch.load(config.resume, map_location=config.device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if policy is not None:
            policy.load_state_dict(state["policy"])
        result.history = state["history"]
        start_epoch = state["epoch"] + 1
        torch.set_rng_state(state["torch_rng"])
    step_fn = torch.compile(net) if config.compile else net

    # Learn&Drop with a cache trains the head from cached prefix outputs: its own forward.
    cached_forward = isinstance(policy, LearnAndDrop) and policy.cache is not None
    for epoch in range(start_epoch, config.epochs):
        if policy is not None:
            policy.start_epoch(epoch)
        dropping = isinstance(policy, LayerDropBack) and policy.dropping
        batch_size = policy.batch_size(config.batch_size) if policy is not None else config.batch_size
        loader = DataLoader(_Indexed(splits.train), batch_size=batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(config.seed * 10_000 + epoch))
        steps = len(loader) if config.max_steps_per_epoch is None else min(len(loader), config.max_steps_per_epoch)
        bar = _progress(steps, f"epoch {epoch + 1}/{config.epochs} {'drop' if dropping else 'full'}",
                        config.progress)
        loss_sum, samples, skipped_share = 0.0, 0, 0.0
        _sync(config.device)
        started = time.perf_counter()
        for step, (x, y, indices) in enumerate(loader):
            if step >= steps:
                break
            x, y = x.to(config.device, non_blocking=True), y.to(config.device, non_blocking=True)
            if flops is not None and dropping:
                skipped_share += sum(flops.weight_grad[i] for i in policy.dropped_indices) / flops.backward
            with _autocast(config):
                logits = policy.forward(x, indices) if cached_forward else step_fn(x)
                loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if policy is not None:
                policy.step()
            loss_sum += loss.item() * len(y)
            samples += len(y)
            bar.update(1)
        _sync(config.device)
        epoch_time = time.perf_counter() - started
        bar.close()
        if policy is not None:
            policy.end_epoch()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        row = {
            "epoch": epoch, "mode": "drop" if dropping else "full", "batch_size": batch_size,
            "lr": lr * (policy.lr_factor if dropping else 1.0), "steps": steps,
            "train_loss": loss_sum / max(samples, 1), "test_acc": evaluate(net, splits.test, config),
            "epoch_time": epoch_time, "time_per_sample": epoch_time / max(samples, 1),
            "bwd_flops_skipped": skipped_share / steps if dropping and steps else 0.0,
        }
        if isinstance(policy, LayerDropBack):
            row["actual_drop_rate"] = policy.stats["actual_drop_rate"]
        elif isinstance(policy, ChannelDropBack):
            row["channel_rate"] = policy.rate
            row["actual_channel_rate"] = policy.stats["actual_channel_rate"]
        elif isinstance(policy, LearnAndDrop):
            row["frozen_layers"] = len(policy.frozen_layers)
        result.history.append(row)
        if config.checkpoint:
            torch.save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "policy": policy.state_dict() if policy is not None else None,
                "epoch": epoch, "history": result.history, "config": asdict(config),
                "torch_rng": torch.get_rng_state(),
            }, config.checkpoint)
        if config.out_dir:
            write_log(result, config.out_dir)
        if on_epoch is not None:  # after the checkpoint: an interrupted run resumes from here
            on_epoch(row)
    if policy is not None:
        policy.remove()
    return result


class _Indexed(torch.utils.data.Dataset):
    """Yields ``(x, y, index)``: Learn&Drop's feature cache stores features per sample."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        x, y = self.dataset[index]
        return x, y, index


def write_log(result: RunResult, out_dir: str, name: str = "log") -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"config": result.config, "history": result.history}, f, indent=1)
    if result.history:
        keys = list(result.history[0])
        with open(os.path.join(out_dir, f"{name}.csv"), "w") as f:
            f.write(",".join(keys) + "\n")
            for row in result.history:
                f.write(",".join(_fmt(row.get(k)) for k in keys) + "\n")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
