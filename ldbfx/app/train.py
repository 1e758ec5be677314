"""The trainer behind ``ldbfx train`` and ``ldbfx demo``: baseline or LayerDropBack, resumable.

One plain loop, written so every number it reports is measured: per-epoch wall time (training
only), time per sample, accuracy on the held-out split, and the share of backward FLOPs skipped
(``FlopCounterMode`` on one batch, per layer, summed over the layers actually dropped).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same loop runs on every rank with DistributedDataParallel:
``batch_size`` stays the *global* batch, each rank takes its slice of every global batch, so the
data order, the masks and the checkpoints do not depend on the number of ranks. Only rank 0 shows
progress and writes logs and checkpoints; every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from . import data as datasets
from ..runtime.distributed import skip_dropped_allreduce
from ..errors import LdbfxError
from ..integrations.inspection import branch_flops, weight_grad_flops
from ..analysis.layers import layers as _layers
from ..runtime.mask import discard_skipped
from ..runtime.module import LdbGraphModule
from ..policies import ChannelDropBack, DropBP, LayerDropBack, LearnAndDrop
from ..rewrite.driver import transform

__all__ = ["TrainConfig", "build_model", "train", "POLICIES"]

POLICIES = ("none", "ldb", "cdb", "learn-and-drop", "dropbp")


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in checkpoints and logs)."""

    data: str = "digits"
    data_dir: str | None = None
    model: str = "resnet18"
    image_size: int = 32
    policy: str = "ldb"  # "none" | "ldb" | "cdb" | "learn-and-drop" | "dropbp"
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
    # DropBP (drop_rate: the branches' rate)
    dropbp_allocation: str = "uniform"  # "uniform" | "sensitivity" (allocated at 10% of the epochs)
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
    skip_dropped_allreduce: bool = True  # under torchrun: dropped layers' gradients are not sent

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        self.milestones = tuple(self.milestones)
        if self.dropbp_allocation not in ("uniform", "sensitivity"):
            raise ValueError(f"dropbp_allocation must be 'uniform' or 'sensitivity', got {self.dropbp_allocation!r}")
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


@dataclass(frozen=True)
class _World:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    size: int = 1
    owns_group: bool = False  # the trainer initialized the process group, so it destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def join(cls, config: TrainConfig) -> _World:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        if config.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if config.device.startswith("cuda") else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), owns_group=True)

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.size:
            raise LdbfxError(
                f"the global batch of {batch_size} does not split over {self.size} ranks: choose a "
                f"--batch-size (times kappa in DROP epochs) divisible by the number of ranks")


class _RankSlice(torch.utils.data.Sampler):
    """This rank's share of each global batch: the global order is the single-process one."""

    def __init__(self, batches: BatchSampler, world: _World):
        self.batches, self.world = batches, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        share = self.batches.batch_size // self.world.size
        start = self.world.rank * share
        for batch in self.batches:
            yield batch[start:start + share]


def _loader(dataset, batch_size: int, seed: int, world: _World) -> DataLoader:
    # The same sampler DataLoader(shuffle=True, drop_last=True, generator=...) builds; sliced per rank.
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_sampler=_RankSlice(BatchSampler(sampler, batch_size, drop_last=True), world))


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

    Returns a :class:`RunResult` with one history row per epoch: mode (LDB's ``full``/``drop``;
    ``full`` without a policy; for the policies that act on every step, their name), batch
    size, LR, train loss, test accuracy, epoch time, time per sample, and the drop statistics.
    Under ``torchrun`` every rank calls it (see the module docstring); rank 0's result is the run's.
    """
    world = _World.join(config)
    try:
        return _train(config, world, on_epoch)
    finally:
        if world.owns_group:
            dist.destroy_process_group()


def _train(config: TrainConfig, world: _World, on_epoch) -> RunResult:
    if world.size > 1 and config.device == "cuda":
        config = replace(config, device=f"cuda:{torch.cuda.current_device()}")
    _seed_all(config.seed)
    splits = datasets.load(config.data, config.data_dir, image_size=config.image_size, seed=config.seed)
    model = build_model(config.model, splits.num_classes).to(config.device)
    net = transform(model) if config.policy != "none" else model
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(config.device.split(":")[0], enabled=config.amp == "fp16")
    stepped = []  # appended to by each optimizer.step(); GradScaler skips it on inf/NaN
    optimizer.register_step_post_hook(lambda *_: stepped.append(True))
    policy = None
    flops = None  # LDB: per-layer dW FLOPs; DropBP: per-branch backward FLOPs
    probe = (torch.stack([splits.train[i][0] for i in range(min(8, len(splits.train)))]).to(config.device)
             if config.policy in ("ldb", "dropbp") else None)  # what the FLOP counts run on
    result = RunResult(asdict(config))
    if config.policy == "ldb":
        policy = LayerDropBack(net, optimizer, drop_rate=config.drop_rate, period=config.period,
                               kappa=config.kappa, lr_scale=config.lr_scale, resample=config.resample,
                               seed=config.seed)
        flops = weight_grad_flops(net, probe)
    elif config.policy == "cdb":
        policy = ChannelDropBack(net, optimizer, layer_rate=config.layer_rate, channel_rate=config.channel_rate,
                                 schedule=config.cdb_schedule, milestones=config.milestones, dim=config.cdb_dim,
                                 selection=config.cdb_selection, seed=config.seed)
    elif config.policy == "learn-and-drop":
        policy = LearnAndDrop(net, optimizer, warmup_epochs=config.warmup_epochs, cache=config.cache,
                              num_samples=len(splits.train), compile_head=config.compile)
    elif config.policy == "dropbp":
        policy = DropBP(net, optimizer, drop_rate=config.drop_rate, allocation=config.dropbp_allocation,
                        seed=config.seed)
        flops = branch_flops(net, probe)
    if policy is not None:
        layers = _layers(net)
        result.layers_total, result.layers_eligible = len(layers), sum(l.eligible for l in layers)
    start_epoch = 0
    if config.resume:
        # On the CPU: the RNG states must stay there, and load_state_dict moves the rest.
        state = torch.load(config.resume, map_location="cpu", weights_only=False)
        changed = _changed_settings(state["config"], config)
        if changed:
            raise LdbfxError(f"--resume {config.resume}: the checkpoint was trained with other settings "
                             f"({'; '.join(changed)}); resume with the checkpoint's settings, or start a new run")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if policy is not None:
            policy.load_state_dict(state["policy"])
        result.history = state["history"]
        start_epoch = state["epoch"] + 1
        if state["config"]["epochs"] != config.epochs:
            _stretch_schedule(scheduler, config.epochs)
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and config.device.startswith("cuda"):
            torch.cuda.set_rng_state(state["cuda_rng"])  # dropout, stochastic depth on the GPU
    # Learn&Drop with a cache trains the head from cached prefix outputs: its own forward.
    cached_forward = isinstance(policy, LearnAndDrop) and policy.cache is not None
    if world.size > 1 and cached_forward:
        raise LdbfxError("Learn&Drop's feature cache trains the head outside DistributedDataParallel: "
                         "run torchrun jobs without --cache")
    wrapped = trainable = comm = compiled = compiled_for = None
    allocate_at = min(math.ceil(0.1 * config.epochs), config.epochs - 1)  # DropBP: at ~10% of training
    for epoch in range(start_epoch, config.epochs):
        if isinstance(policy, DropBP) and config.dropbp_allocation == "sensitivity" \
                and policy.sensitivity is None and epoch >= allocate_at:
            n = min(config.batch_size, len(splits.train))
            probe_x = torch.stack([splits.train[i][0] for i in range(n)]).to(config.device)
            probe_y = torch.tensor([int(splits.train[i][1]) for i in range(n)], device=config.device)
            policy.allocate(lambda: F.cross_entropy(net(probe_x), probe_y))
        if policy is not None:
            policy.start_epoch(epoch)
        if world.size > 1 and trainable != (now := tuple(p.requires_grad for p in model.parameters())):
            # DDP fixes its parameter set when built; Learn&Drop's freezing changes it (at most
            # once per epoch), so wrap again: frozen layers then send no gradients at all.
            trainable, wrapped, comm = now, _ddp(net, config), None
            if isinstance(policy, LayerDropBack) and config.skip_dropped_allreduce:
                comm = skip_dropped_allreduce(wrapped)
        step_fn = wrapped if wrapped is not None else net
        if config.compile and compiled_for is not step_fn:
            compiled, compiled_for = torch.compile(step_fn), step_fn
        step_fn = compiled if config.compile else step_fn
        dropping = isinstance(policy, LayerDropBack) and policy.dropping
        # LDB alternates full and DROP epochs; the other policies act on every step.
        mode = "drop" if dropping else "full" if policy is None or isinstance(policy, LayerDropBack) \
            else config.policy
        batch_size = policy.batch_size(config.batch_size) if policy is not None else config.batch_size
        world.check_batch(batch_size)
        loader = _loader(_Indexed(splits.train), batch_size, config.seed * 10_000 + epoch, world)
        steps = len(loader) if config.max_steps_per_epoch is None else min(len(loader), config.max_steps_per_epoch)
        bar = _progress(steps, f"epoch {epoch + 1}/{config.epochs} {mode}",
                        config.progress and world.main)
        sent = (comm.bytes_reduced, comm.bytes_skipped) if comm is not None else None
        # The losses stay on the device until the epoch ends: one .item() per step would make the
        # host wait for every step's GPU work, and the epoch's time would include those waits.
        losses, sizes, skipped_share = [], [], 0.0
        _sync(config.device)
        started = time.perf_counter()
        for step, (x, y, indices) in enumerate(loader):
            if step >= steps:
                break
            x, y = x.to(config.device, non_blocking=True), y.to(config.device, non_blocking=True)
            if flops is not None and dropping:
                skipped_share += sum(flops.weight_grad[i] for i in policy.dropped_indices) / flops.backward
            elif isinstance(policy, DropBP):  # dX and dW of whole branches, every step
                skipped_share += flops.share(policy.dropped_indices)
            with _autocast(config):
                logits = policy.forward(x, indices) if cached_forward else step_fn(x)
                loss = F.cross_entropy(logits, y)
            # With fp16: scaled backward; scaler.step unscales, then skips the step on inf/NaN.
            # ldbfx's optimizer hook runs inside optimizer.step, so dropped layers stay untouched.
            # A skipped step's gradients are thrown away, and so is its record of what it skipped
            # (else the next step would leave those layers untouched too).
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if not stepped and isinstance(net, LdbGraphModule):
                discard_skipped(net)
            stepped.clear()
            optimizer.zero_grad(set_to_none=True)
            if policy is not None:
                policy.step()
            losses.append(loss.detach())
            sizes.append(len(y))
            bar.update(1)
        _sync(config.device)
        epoch_time = time.perf_counter() - started
        bar.close()
        loss_sum, samples = 0.0, sum(sizes)
        for value, size in zip(torch.stack(losses).float().tolist() if losses else [], sizes):
            loss_sum += value * size  # in Python floats, in step order, as it always was
        if policy is not None:
            policy.end_epoch()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        test_acc = evaluate(net, splits.test, config) if world.main else 0.0
        if world.size > 1:  # the global loss, and rank 0's accuracy (its model is the checkpoint's)
            totals = torch.tensor([loss_sum, samples, test_acc], dtype=torch.float64, device=config.device)
            dist.all_reduce(totals)
            loss_sum, samples, test_acc = totals[0].item(), int(totals[1].item()), totals[2].item()
        row = {
            "epoch": epoch, "mode": mode, "batch_size": batch_size,
            "lr": lr * (policy.lr_factor if dropping else 1.0), "steps": steps,
            "train_loss": loss_sum / max(samples, 1), "test_acc": test_acc,
            "epoch_time": epoch_time, "time_per_sample": epoch_time / max(samples, 1),
            "bwd_flops_skipped": skipped_share / steps if (dropping or isinstance(policy, DropBP)) and steps else 0.0,
        }
        if sent is not None:  # what this rank's DDP all-reduced per step, and left out
            row["allreduce_bytes"] = (comm.bytes_reduced - sent[0]) / max(steps, 1)
            row["allreduce_bytes_skipped"] = (comm.bytes_skipped - sent[1]) / max(steps, 1)
        if isinstance(policy, (LayerDropBack, DropBP)):
            row["actual_drop_rate"] = policy.stats["actual_drop_rate"]
        elif isinstance(policy, ChannelDropBack):
            row["channel_rate"] = policy.rate
            row["actual_channel_rate"] = policy.stats["actual_channel_rate"]
        elif isinstance(policy, LearnAndDrop):
            row["frozen_layers"] = len(policy.frozen_layers)
        result.history.append(row)
        if config.checkpoint and world.main:
            os.makedirs(os.path.dirname(os.path.abspath(config.checkpoint)), exist_ok=True)
            torch.save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "policy": policy.state_dict() if policy is not None else None,
                "epoch": epoch, "history": result.history, "config": asdict(config),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if config.device.startswith("cuda") else None,
            }, config.checkpoint)
        if config.checkpoint and world.size > 1:
            dist.barrier()  # no rank goes on before the checkpoint it would resume from exists
        if config.out_dir and world.main:
            write_log(result, config.out_dir)
        if on_epoch is not None:  # after the checkpoint: an interrupted run resumes from here
            on_epoch(row)
    if policy is not None:
        policy.remove()
    return result


# What a resumed run may change: where it writes and how it runs, not what it computes; and how
# long it trains (the cosine schedule is stretched from the resumed epoch on).
_FREE_ON_RESUME = {"out_dir", "checkpoint", "resume", "progress", "device", "compile",
                   "skip_dropped_allreduce", "epochs"}


def _changed_settings(saved: dict, config: TrainConfig) -> list[str]:
    """The settings of ``config`` that differ from a checkpoint's (``saved``) and may not."""
    now = asdict(config)
    return [f"--{key.replace('_', '-')} {now[key]!r}, the checkpoint's {saved[key]!r}"
            for key in now if key not in _FREE_ON_RESUME and key in saved and saved[key] != now[key]]


def _stretch_schedule(scheduler: torch.optim.lr_scheduler.CosineAnnealingLR, epochs: int) -> None:
    """A resumed run with another ``--epochs``: the cosine ends at the new last epoch, and the
    learning rate from here on is what a run of ``epochs`` would have (the epochs done keep theirs).
    Without this the loaded ``T_max`` stays the old one, and past it the cosine climbs back up."""
    scheduler.T_max = epochs
    t = scheduler.last_epoch
    for group in scheduler.optimizer.param_groups:
        group["lr"] = scheduler.eta_min + (group["initial_lr"] - scheduler.eta_min) * (1 + math.cos(math.pi * t / epochs)) / 2


def _ddp(net: torch.nn.Module, config: TrainConfig) -> torch.nn.parallel.DistributedDataParallel:
    device = torch.device(config.device)
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)


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
