"""Hugging Face ``Trainer`` integration: run any ldbfx policy from a ``TrainerCallback``.

Importing this module imports ``transformers`` (``pip install ldbfx[hf]``); ``import ldbfx`` never
does. The three lines::

    gm = ldbfx.transform(model, example_kwargs=next(iter(loader)))  # capture once (torch.export)
    ldbfx.install(model, gm)                                        # model.forward trains via gm
    Trainer(model=model, ..., callbacks=[LdbCallback(gm, ldbfx.LayerDropBack, kappa=1)]).train()

The callback builds the policy when training begins (the Trainer creates the optimizer inside
``train()``, and policies hook the optimizer), then calls its loop methods: ``start_epoch`` at
each epoch begin, ``step`` after each optimizer step (so masks change only between optimizer
steps, never between the micro-batches of one accumulated step), ``end_epoch`` at each epoch
end, and ``remove`` when training ends.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

from transformers import TrainerCallback

from .errors import LdbfxError
from .install import check_unchanged, installed
from .mask import discard_skipped

__all__ = ["LdbCallback"]


class LdbCallback(TrainerCallback):
    """Runs an ldbfx policy (LayerDropBack, ChannelDropBack, Learn&Drop) inside ``Trainer``.

    Args:
        gm: the transformed model, installed on the Trainer's model (:func:`ldbfx.install`).
        policy: the policy class, for example :class:`ldbfx.LayerDropBack`.
        **policy_kwargs: its keyword arguments (``drop_rate``, ``period``, ``seed``...).

    Raises:
        LdbfxError: the policy would change the batch size (``kappa != 1``): the Trainer's
            dataloader keeps one batch size, so κ-times larger DROP batches cannot be honoured.
            Pass ``kappa=1`` (the LR factor ``lr_scale`` still applies), or use ``ldbfx train``.

    Example:
        >>> from ldbfx.hf import LdbCallback  # doctest: +SKIP
        >>> callback = LdbCallback(gm, ldbfx.LayerDropBack, drop_rate=0.3, period=2, kappa=1)  # doctest: +SKIP
        >>> Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()  # doctest: +SKIP
        >>> callback.policy.stats["steps_drop"]  # doctest: +SKIP
    """

    def __init__(self, gm, policy: type, **policy_kwargs: Any):
        if not isinstance(policy, type):
            raise TypeError(f"policy must be a policy class such as ldbfx.LayerDropBack, got {policy!r}")
        kappa = policy_kwargs.get("kappa", _default(policy, "kappa", 1.0))
        if kappa != 1:
            raise LdbfxError(
                f"{policy.__name__}(kappa={kappa}) asks for {kappa}x larger batches in DROP epochs, but "
                "the Trainer's dataloader keeps one batch size. Pass kappa=1 (lr_scale still scales "
                "the learning rate in DROP epochs), or train with `ldbfx train`, which resizes batches")
        self.gm, self.policy_class, self.policy_kwargs = gm, policy, policy_kwargs
        self.policy = None
        self._epoch = 0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is not None and installed(model) is not self.gm:
            raise LdbfxError(
                "the Trainer's model does not train through this graph: call "
                "ldbfx.install(model, gm) before Trainer(model=model, ...), with the gm given to "
                "LdbCallback; without it every layer would silently get its full backward")
        if model is not None:
            check_unchanged(model, self.gm)  # Trainer's NEFTune hook and token alignment come late
            if getattr(args, "gradient_accumulation_steps", 1) > 1 and getattr(model.forward, "drops_loss_kwargs", False):
                warnings.warn(
                    "the graph takes no num_items_in_batch, so with gradient accumulation Trainer "
                    "averages the loss per micro-batch instead of per token over the accumulated "
                    "batch, unlike a plain run of this model. To match it, capture with "
                    "num_items_in_batch in the example batch: ldbfx.transform(model, example_kwargs="
                    "{**batch, 'num_items_in_batch': torch.tensor(1.0)})", UserWarning, stacklevel=2)
        # accelerate wraps the optimizer; policies hook the torch optimizer that steps.
        while optimizer is not None and not hasattr(optimizer, "_optimizer_step_pre_hooks"):
            optimizer = getattr(optimizer, "optimizer", None)
        self.policy = self.policy_class(self.gm, optimizer, **self.policy_kwargs)
        self._epoch = math.floor((state.epoch or 0.0) + 1e-6)  # resumed runs start later

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.policy.start_epoch(self._epoch)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        # accelerate's optimizer says whether GradScaler skipped the step (inf/NaN): its
        # gradients are gone, and so must be its record of what the backward skipped.
        if getattr(optimizer, "step_was_skipped", False):
            discard_skipped(self.gm)
        self.policy.step()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.policy.end_epoch()
        self._epoch += 1

    def on_train_end(self, args, state, control, **kwargs):
        remove = getattr(self.policy, "remove", None)
        if callable(remove):
            remove()


def _default(cls: type, name: str, fallback: Any) -> Any:
    parameter = inspect.signature(cls).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return fallback
    return parameter.default


#: Small sizes for :func:`tiny_model` (the names most configs use; others keep their defaults).
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128,
        "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "image_size": 32,
        "patch_size": 8, "use_cache": False}


def tiny_model(model_type: str, seed: int = 0):
    """A small random-init Hugging Face model of ``model_type`` and an example batch (no download).

    For ``ldbfx inspect hf:<model_type>`` and quick experiments. Causal LMs come with
    ``labels``; image models (``vit``...) take ``pixel_values``.

    Example:
        >>> model, batch = tiny_model("llama")  # doctest: +SKIP
        >>> gm = ldbfx.transform(model, example_kwargs=batch)  # doctest: +SKIP
    """
    import torch
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
    )
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    )

    try:
        config = AutoConfig.for_model(model_type, **TINY)
    except ValueError:
        raise LdbfxError(f"unknown Hugging Face model type {model_type!r}; examples: llama, bert, "
                         "gpt2, vit, mistral, qwen2") from None
    torch.manual_seed(seed)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        ids = torch.randint(0, config.vocab_size, (2, 16))
        return AutoModelForCausalLM.from_config(config), {"input_ids": ids, "labels": ids}
    if model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        size = getattr(config, "image_size", 32)
        return AutoModelForImageClassification.from_config(config), {
            "pixel_values": torch.randn(2, getattr(config, "num_channels", 3), size, size)}
    return AutoModel.from_config(config), {"input_ids": torch.randint(0, config.vocab_size, (2, 16))}
