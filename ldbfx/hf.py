"""Hugging Face ``Trainer`` integration: run any ldbfx policy from a ``TrainerCallback``.

Importing this module imports ``transformers`` (``pip install ldbfx[hf]``); ``import ldbfx`` never
does. The lines::

    model.to(device)                                                # the capture fixes the device
    gm = ldbfx.transform(model, example_kwargs=next(iter(loader)))  # capture once (torch.export)
    ldbfx.install(model, gm)                                        # model.forward trains via gm
    Trainer(model=model, ..., callbacks=[LdbCallback(gm, ldbfx.LayerDropBack, kappa=1)]).train()

The callback builds the policy when training begins (the Trainer creates the optimizer inside
``train()``, and policies hook the optimizer), then calls its loop methods: ``start_epoch`` at
each epoch begin, ``step`` after each optimizer step (so masks change only between optimizer
steps, never between the micro-batches of one accumulated step), ``end_epoch`` at each epoch
end, and ``remove`` when training ends. The policy's state travels in Trainer's checkpoints
(``trainer_state.json``), so a resumed run draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import base64
import inspect
import io
import math
import warnings
from typing import Any

import torch
from transformers import TrainerCallback

from .errors import LdbfxError
from .install import check_unchanged, installed, routed_forward
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
        self._in_epoch = False  # between on_epoch_begin and on_epoch_end
        self._resumed_in_epoch = False  # the loaded state already began the current epoch

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is not None and installed(model) is not self.gm:
            raise LdbfxError(
                "the Trainer's model does not train through this graph: call "
                "ldbfx.install(model, gm) before Trainer(model=model, ...), with the gm given to "
                "LdbCallback; without it every layer would silently get its full backward")
        mode = getattr(args, "parallel_mode", None)
        if getattr(args, "n_gpu", 1) > 1 and getattr(mode, "value", mode) == "not_distributed":
            # Trainer wraps the model in nn.DataParallel: every replica would call the one
            # installed forward, whose graph runs over the modules on the first GPU.
            raise LdbfxError(
                f"Trainer found {args.n_gpu} GPUs in one process and would train through "
                "nn.DataParallel, which an installed ldbfx graph cannot follow. Launch with "
                "torchrun (one process per GPU, DistributedDataParallel), or make one GPU visible "
                "(CUDA_VISIBLE_DEVICES=0)")
        if model is not None:
            check_unchanged(model, self.gm)  # Trainer's NEFTune hook and token alignment come late
            # A plain run hands the model the token count of the accumulated batch (over every
            # rank where average_tokens_across_devices, the default), and the loss is per token.
            accumulating = getattr(args, "gradient_accumulation_steps", 1) > 1
            across_ranks = getattr(args, "world_size", 1) > 1 and getattr(args, "average_tokens_across_devices", False)
            if (accumulating or across_ranks) and routed_forward(model).drops_loss_kwargs:
                warnings.warn(
                    "the graph takes no num_items_in_batch, so Trainer averages the loss per "
                    "micro-batch and rank instead of per token over the accumulated batch (and "
                    "ranks), unlike a plain run of this model. To match it, capture with "
                    "num_items_in_batch in the example batch: ldbfx.transform(model, example_kwargs="
                    "{**batch, 'num_items_in_batch': torch.tensor(1.0)})", UserWarning, stacklevel=2)
        # accelerate wraps the optimizer; policies hook the torch optimizer that steps.
        while optimizer is not None and not hasattr(optimizer, "_optimizer_step_pre_hooks"):
            optimizer = getattr(optimizer, "optimizer", None)
        self.policy = self.policy_class(self.gm, optimizer, **self.policy_kwargs)
        self._epoch = math.floor((state.epoch or 0.0) + 1e-6)  # resumed runs start later
        self._resumed_in_epoch = False
        if state.global_step > 0:
            self._resume(state)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._in_epoch = True
        if self._resumed_in_epoch:  # resumed mid-epoch: the loaded state holds this epoch's draws
            self._resumed_in_epoch = False
            return
        self.policy.start_epoch(self._epoch)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        # accelerate's optimizer says whether GradScaler skipped the step (inf/NaN): its
        # gradients are gone, and so must be its record of what the backward skipped.
        if getattr(optimizer, "step_was_skipped", False):
            discard_skipped(self.gm)
        self.policy.step()
        if getattr(control, "should_save", False):  # Trainer writes the checkpoint right after us
            self._remember(state)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.policy.end_epoch()
        self._epoch += 1
        self._in_epoch = False
        if getattr(control, "should_save", False):
            self._remember(state)

    def on_evaluate(self, args, state, control, **kwargs):
        # save_strategy="best" decides to save after evaluating, past the other hooks
        if self.policy is not None and getattr(args, "save_strategy", None) == "best":
            self._remember(state)

    def _remember(self, state) -> None:
        """Puts the policy's state where Trainer's next checkpoint saves it: ``trainer_state.json``
        keeps every entry of ``stateful_callbacks`` (JSON, so the state goes in as base64)."""
        buffer = io.BytesIO()
        torch.save(self.policy.state_dict(), buffer)
        state.stateful_callbacks[STATE_KEY] = {
            "policy": self.policy_class.__name__, "step": state.global_step, "epoch": self._epoch,
            "in_epoch": self._in_epoch, "state": base64.b64encode(buffer.getvalue()).decode("ascii")}

    def _resume(self, state) -> None:
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        if saved is None or saved["step"] != state.global_step:
            why = ("without LdbCallback's state (saved by ldbfx before it kept one, or by a run "
                   "without the callback)" if saved is None else
                   f"whose LdbCallback state is from step {saved['step']} (a callback after it asked "
                   "Trainer to save)")
            warnings.warn(
                f"Trainer resumed at step {state.global_step} from a checkpoint {why}: "
                f"{self.policy_class.__name__} draws afresh from epoch {self._epoch} on, not what "
                "the uninterrupted run would have drawn", UserWarning, stacklevel=3)
            return
        if saved["policy"] != self.policy_class.__name__:
            raise LdbfxError(f"the checkpoint holds a {saved['policy']} policy's state, and this run "
                             f"asks for {self.policy_class.__name__}: resume with the same policy")
        self.policy.load_state_dict(torch.load(io.BytesIO(base64.b64decode(saved["state"])), weights_only=True))
        if saved["in_epoch"] and saved["epoch"] == self._epoch:
            self._resumed_in_epoch = True
        elif saved["in_epoch"]:  # saved after an epoch's last step; Trainer does not replay its end
            self.policy.end_epoch()
        elif saved["epoch"] != self._epoch:  # max_steps ended the run inside an epoch, then saved
            warnings.warn(
                f"the checkpoint ended epoch {self._epoch} inside it (max_steps), and Trainer "
                f"resumes that epoch: {self.policy_class.__name__} starts it again, a draw apart "
                "from a run that had not stopped", UserWarning, stacklevel=3)

    def on_train_end(self, args, state, control, **kwargs):
        remove = getattr(self.policy, "remove", None)
        if callable(remove):
            remove()


#: The key of LdbCallback's entry in ``TrainerState.stateful_callbacks``. Not the class name:
#: Trainer's ``restore_callback_states_from_checkpoint`` rebuilds callbacks under their class
#: name from saved constructor arguments, which a graph and a policy class are not.
STATE_KEY = "ldbfx.LdbCallback"


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
