"""The workloads that the time-to-loss benchmark and the language-model demo race on.

Both use real data every machine has offline: the Python standard library's source as bytes (a
byte-level Llama-style decoder, Hugging Face ``transformers``, random init, captured with
``torch.export``) and scikit-learn's embedded digits (the demo's ResNet-18 at 32 px).

Example:
    >>> from ldbfx.app.workloads import digits_task
    >>> task = digits_task(classes=range(5))
    >>> task.n_samples > 600, task.higher_is_better
    (True, True)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import data as datasets
from .race import Task

__all__ = ["LmSize", "lm_task", "digits_task", "lora"]


class LmSize:
    """A byte-level Llama's size: (hidden, layers, sequence, batch) by preset name.

    ``small`` fits 2 CPU cores; ``tiny`` is for tests; ``gpu`` is what ``benchmarks/gpu.sh`` races.
    """

    presets = {"tiny": (64, 4, 32, 4), "small": (128, 6, 128, 16), "gpu": (512, 8, 256, 32)}

    def __init__(self, name: str = "small"):
        if name not in self.presets:
            raise ValueError(f"size must be one of {sorted(self.presets)}, got {name!r}")
        self.name = name
        self.hidden, self.layers, self.seq, self.batch = self.presets[name]


def llama(size: LmSize) -> nn.Module:
    """A random-init byte-level ``LlamaForCausalLM`` (vocabulary 256, head dim 32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=size.hidden, intermediate_size=size.hidden * 8 // 3,
                         num_hidden_layers=size.layers, num_attention_heads=size.hidden // 32,
                         num_key_value_heads=size.hidden // 32, max_position_embeddings=size.seq,
                         use_cache=False, attn_implementation="sdpa", tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def lora(rank: int = 8):
    """A ``prepare`` step that wraps the model in PEFT LoRA on every projection (base frozen)."""
    from peft import LoraConfig, get_peft_model

    def prepare(model: nn.Module) -> nn.Module:
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                            "up_proj", "down_proj"])
        return get_peft_model(model, config)

    return prepare


def lm_task(size: LmSize | str = "small", domain: str = "library", *, init: dict | None = None,
            max_bytes: int | None = None, eval_batches: int = 8, prepare=None, device: str = "cpu",
            epoch_steps: int = 10) -> Task:
    """Next-byte prediction on the standard library's source (validation: every 20th file).

    Args:
        size: the model and batch preset.
        domain: ``"library"`` (pretraining) or ``"tests"`` (the ``test`` package: fine-tuning).
        init: a state dict to start from (a checkpoint of a ``"library"`` run).
        max_bytes: cap on the training text.
        eval_batches: validation batches (fixed windows spread over the validation files).
        prepare: applied before the capture (:func:`lora`).
        device: where the model and the text live.
        epoch_steps: steps in an "epoch" (text has no natural one; LayerDropBack's DROP epochs
            come every ``period`` of them, so a short run must still span several).
    """
    size = LmSize(size) if isinstance(size, str) else size
    text = datasets.stdlib_text(domain, max_bytes=max_bytes)
    train, validation = text.train.long().to(device), text.validation.long().to(device)
    offsets = torch.arange(size.seq, device=device)

    def windows(tokens: torch.Tensor, starts: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = tokens[starts.to(device)[:, None] + offsets]
        return {"input_ids": ids, "labels": ids}  # the model shifts the labels itself

    starts = torch.linspace(0, len(validation) - size.seq - 1, eval_batches * size.batch).long()
    held_out = [windows(validation, s) for s in starts.split(size.batch)]

    def build() -> nn.Module:
        model = llama(size)
        if init is not None:
            model.load_state_dict(init)
        return model.to(device)

    def evaluate(module: nn.Module) -> float:
        return sum(float(module(**b).loss) for b in held_out) / len(held_out)

    task = Task(build=build, batch=lambda i: windows(train, i), n_samples=len(train) - size.seq,
                loss=lambda module, b: module(**b).loss, evaluate=evaluate, batch_size=size.batch,
                epoch_steps=epoch_steps, capture={"example_kwargs": held_out[0]}, prepare=prepare,
                with_replacement=True, source=f"stdlib source, {text.fingerprint}")
    return task


def digits_task(classes: Iterable[int] = range(10), *, init: dict | None = None, model: str = "resnet18",
                batch_size: int = 64, device: str = "cpu") -> Task:
    """Digit classification at 32 px (the demo's setting); accuracy on the held-out fifth.

    Args:
        classes: the digits trained and tested (``range(5)`` to pretrain, ``range(5, 10)`` to
            fine-tune on a held-out domain).
        init: a state dict to start from (the head is kept: labels stay 0-9).
        model: a torchvision or timm model name.
        batch_size: the baseline's batch size.
        device: where the model and the images live.
    """
    from .train import build_model

    splits = datasets.load("digits", image_size=32, seed=0)
    wanted = torch.tensor(sorted(set(classes)))

    def subset(split):
        images, labels = split.tensors
        keep = torch.isin(labels, wanted)
        return images[keep].to(device), labels[keep].to(device)

    (x, y), (x_test, y_test) = subset(splits.train), subset(splits.test)

    def build() -> nn.Module:
        net = build_model(model, 10)
        if init is not None:
            net.load_state_dict(init)
        return net.to(device)

    def evaluate(module: nn.Module) -> float:
        correct = sum(int((module(xb).argmax(1) == yb).sum()) for xb, yb in
                      zip(x_test.split(batch_size), y_test.split(batch_size)))
        return correct / len(y_test)

    return Task(build=build, batch=lambda i: (x[i.to(device)], y[i.to(device)]), n_samples=len(y),
                loss=lambda module, b: F.cross_entropy(module(b[0]), b[1]), evaluate=evaluate,
                batch_size=batch_size, epoch_steps=max(1, len(y) // batch_size), higher_is_better=True,
                source=f"scikit-learn digits, classes {wanted.tolist()}")
