"""Hugging Face ``Trainer`` integration: run any ldbfx policy from a ``TrainerCallback``.

Importing this module imports ``transformers`` (``pip install ldbfx[hf]``); ``import ldbfx`` never
does. One line::

    Trainer(model=model, ..., callbacks=[LdbCallback(ldbfx.DropBP, drop_rate=0.5)]).train()

captures the model from the first training batch (see :class:`LdbCallback`). The explicit form
captures it yourself::

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

from ..errors import LdbfxError
from .first_call import capturing_forward, install_on_first_call
from .install import check_unchanged, installed, routed_forward, uninstall
from ..runtime.mask import discard_skipped
from ..capture.trace import has_hooks

__all__ = ["LdbCallback", "tiny_model"]


class LdbCallback(TrainerCallback):
    """Runs an ldbfx policy (DropBP, LayerDropBack, ChannelDropBack, Learn&Drop) inside ``Trainer``.

    Two forms. The one-line form takes the policy class alone: the callback installs a forward on
    the Trainer's model that captures it from the first training batch exactly as Trainer
    prepares it (device, ``bf16``/``fp16`` autocast, ``num_items_in_batch``), trains through the
    graph from then on, and builds the policy right after the capture, before its first
    ``start_epoch``. The explicit form takes a graph you captured and installed yourself
    (:func:`ldbfx.transform`, :func:`ldbfx.install`), for control over the capture.

    Args:
        *graph_and_policy: ``(policy,)``, or ``(gm, policy)`` with ``gm`` installed on the model.
        allocate_at: with ``allocation="sensitivity"`` (DropBP), the fraction of the run's
            optimizer steps after which :meth:`ldbfx.DropBP.allocate` runs on the next training
            batch (the paper: about 10%; ``0`` = the first batch). Rates are uniform until then.
            Default: ``0.1``.
        blocks: in the one-line form, install a graph per block (see :func:`ldbfx.install`):
            ``"auto"`` (the decoder layers), a module class, or module names. The model then keeps
            its module boundaries, for activation checkpointing (``gradient_checkpointing=True``
            chooses ``"auto"`` when this is left ``None``). For FSDP2 per block (Trainer's
            ``fsdp_config``), which shards the model before its first batch, install per block
            yourself before building the Trainer and use the explicit form. Default: ``None``.
        **options: the policy's keyword arguments (``drop_rate``, ``period``, ``seed``...) and, in
            the one-line form, :func:`ldbfx.transform`'s (``keep_first_blocks``,
            ``extra_branches``, ``dynamic_shapes``...).

    Attributes:
        gm: the transformed model (in the one-line form, once training has begun).
        policy: the policy (in the one-line form, from the first training batch on).

    Raises:
        LdbfxError: the policy would change the batch size (``kappa != 1``): the Trainer's
            dataloader keeps one batch size, so κ-times larger DROP batches cannot be honoured.
            Pass ``kappa=1`` (the LR factor ``lr_scale`` still applies), or use ``ldbfx train``.
            Also: ``allocation="sensitivity"`` for a policy without an allocation.
        TypeError: an option neither the policy nor :func:`ldbfx.transform` takes, or transform
            options given with a graph that is already captured.
        ValueError: ``allocate_at`` outside ``[0, 1)``.

    Example:
        >>> from ldbfx.hf import LdbCallback  # doctest: +SKIP
        >>> callback = LdbCallback(ldbfx.DropBP, drop_rate=0.5)  # doctest: +SKIP
        >>> Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()  # doctest: +SKIP
        >>> callback.policy.stats["actual_drop_rate"]  # doctest: +SKIP
    """

    def __init__(self, *graph_and_policy: Any, allocate_at: float = 0.1, blocks: Any = None, **options: Any):
        if len(graph_and_policy) == 1:
            gm, policy = None, graph_and_policy[0]
        elif len(graph_and_policy) == 2:
            gm, policy = graph_and_policy
        else:
            raise TypeError("LdbCallback takes the policy class (LdbCallback(ldbfx.DropBP, drop_rate=0.5)), "
                            "or an installed graph and the policy class (LdbCallback(gm, ldbfx.DropBP, ...))")
        if not isinstance(policy, type):
            raise TypeError(f"policy must be a policy class such as ldbfx.DropBP, got {policy!r}")
        transform_names = _transform_options()
        self.transform_options = {k: options.pop(k) for k in list(options) if k in transform_names}
        try:  # an unknown option fails here, not at the first batch
            inspect.signature(policy).bind(None, None, **options)
        except TypeError as cause:
            raise TypeError(f"{policy.__name__}: {cause} (nor an option of ldbfx.transform)") from None
        if gm is not None and blocks is not None:
            raise TypeError("blocks configures the capture, but this graph is already captured: pass it "
                            "to ldbfx.install(model, gm, blocks=...), or use LdbCallback(policy, blocks=...)")
        self.blocks = blocks
        if gm is not None and self.transform_options:
            raise TypeError(f"{', '.join(self.transform_options)} configure the capture, but this graph is "
                            "already captured: pass them to ldbfx.transform, or use LdbCallback(policy, ...)")
        kappa = options.get("kappa", _default(policy, "kappa", 1.0))
        if kappa != 1:
            raise LdbfxError(
                f"{policy.__name__}(kappa={kappa}) asks for {kappa}x larger batches in DROP epochs, but "
                "the Trainer's dataloader keeps one batch size. Pass kappa=1 (lr_scale still scales "
                "the learning rate in DROP epochs), or train with `ldbfx train`, which resizes batches")
        if not (isinstance(allocate_at, (int, float)) and 0.0 <= allocate_at < 1.0):
            raise ValueError(f"allocate_at must be in [0, 1), got {allocate_at!r}")
        self.allocates = options.get("allocation") == "sensitivity"
        if self.allocates and not hasattr(policy, "allocate"):
            raise LdbfxError(f"{policy.__name__} has no sensitivity allocation (DropBP has)")
        self.gm, self.policy_class, self.policy_kwargs = gm, policy, options
        self._captures = gm is None  # the one-line form
        self.allocate_at = float(allocate_at)
        self.policy = None
        self._model = None
        self._optimizer = None
        self._trainer_state = None
        self._allocate_step: int | None = None  # the optimizer step after which allocate() runs
        self._allocation_hook = None  # per block: the model's pre-hook that runs allocate()
        self._epoch = 0
        self._in_epoch = False  # between on_epoch_begin and on_epoch_end
        self._resumed_in_epoch = False  # the loaded state already began the current epoch

    def _blocks(self, args) -> Any:
        """What the one-line form installs per block: ``blocks``, or the decoder layers when
        Trainer turns activation checkpointing on (which a whole graph cannot run)."""
        checkpointing = getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)
        if self.blocks is None and checkpointing:  # the newer name first (5.x renamed it)
            return "auto"
        return self.blocks

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._model = model
        if self._captures and model is not None:
            # Before train(), so that accelerate's autocast wrapper goes around the capturing
            # forward. Disarmed until training begins: other calls run the model's own forward.
            pending = capturing_forward(model)
            if pending is None and "_ldbfx_installed" not in model.__dict__:
                install_on_first_call(model, self._captured, blocks=self._blocks(args), **self.transform_options)
                pending = capturing_forward(model)
            if pending is not None:
                pending.disarm()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        model = model if model is not None else self._model
        self._model = model
        if self._captures:
            self.gm, self.policy = None, None  # each train() captures from its own first batch
            try:
                self._refuse_data_parallel(args)
                self._arm_capture(args, model)
            except LdbfxError:
                pending = capturing_forward(model) if model is not None else None
                if pending is not None:
                    pending.disarm()  # refused before training: the model runs its own forward
                raise
        else:
            self._refuse_data_parallel(args)
            if model is not None:
                self._check_installed(args, model)
        # accelerate wraps the optimizer; policies hook the torch optimizer that steps.
        while optimizer is not None and not hasattr(optimizer, "_optimizer_step_pre_hooks"):
            optimizer = getattr(optimizer, "optimizer", None)
        self._optimizer, self._trainer_state = optimizer, state
        self._epoch = math.floor((state.epoch or 0.0) + 1e-6)  # resumed runs start later
        self._resumed_in_epoch = False
        self._in_epoch = False
        if self.allocates:
            self._allocate_step = math.ceil(self.allocate_at * max(state.max_steps, 0))
        if not self._captures:
            self._build_policy()

    @staticmethod
    def _refuse_data_parallel(args) -> None:
        if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
            # Its engine partitions the parameters (ZeRO-3 gathers them in module hooks it owns)
            # and runs the backward and the optimizer step itself, past ldbfx's optimizer hook.
            raise LdbfxError(
                "DeepSpeed is not served by ldbfx: its engine partitions parameters and steps the "
                "optimizer itself, so dropped layers would still be updated. Shard with FSDP2 "
                "instead, installed per block before the Trainer is built: ldbfx.install(model, gm, "
                "blocks='auto', example_kwargs=batch), then LdbCallback(gm, policy) with Trainer's "
                "fsdp_config={'version': 2, ...} or torch's fully_shard per block")
        mode = getattr(args, "parallel_mode", None)
        if getattr(args, "n_gpu", 1) > 1 and getattr(mode, "value", mode) == "not_distributed":
            # Trainer wraps the model in nn.DataParallel: every replica would call the one
            # installed forward, whose graph runs over the modules on the first GPU.
            raise LdbfxError(
                f"Trainer found {args.n_gpu} GPUs in one process and would train through "
                "nn.DataParallel, which an installed ldbfx graph cannot follow. Launch with "
                "torchrun (one process per GPU, DistributedDataParallel), or make one GPU visible "
                "(CUDA_VISIBLE_DEVICES=0)")

    def _check_installed(self, args, model) -> None:
        """The explicit form: the Trainer's model trains through this graph, unchanged since."""
        if installed(model) is not self.gm:
            raise LdbfxError(
                "the Trainer's model does not train through this graph: call "
                "ldbfx.install(model, gm) before Trainer(model=model, ...), with the gm given to "
                "LdbCallback; without it every layer would silently get its full backward")
        if not self.gm.ldbfx_state.blocks:  # per block, the model's own forward runs: FSDP2's new
            # parameters and hooks, the checkpointing switch's hook on the embeddings are expected
            check_unchanged(model, self.gm)  # Trainer's NEFTune hook and token alignment come late
        # A plain run hands the model the token count of the accumulated batch (over every
        # rank where average_tokens_across_devices, the default), and the loss is per token.
        accumulating = getattr(args, "gradient_accumulation_steps", 1) > 1
        across_ranks = getattr(args, "world_size", 1) > 1 and getattr(args, "average_tokens_across_devices", False)
        routed = routed_forward(model)  # None per block: the model's own forward takes the count
        if (accumulating or across_ranks) and routed is not None and routed.drops_loss_kwargs:
            warnings.warn(
                "the graph takes no num_items_in_batch, so Trainer averages the loss per "
                "micro-batch and rank instead of per token over the accumulated batch (and "
                "ranks), unlike a plain run of this model. To match it, capture with "
                "num_items_in_batch in the example batch: ldbfx.transform(model, example_kwargs="
                "{**batch, 'num_items_in_batch': torch.tensor(1.0)}), or use LdbCallback(policy, ...)",
                UserWarning, stacklevel=3)

    def _arm_capture(self, args, model) -> None:
        """The one-line form, before training: refuses what the first batch's capture could not
        serve, then arms the capturing forward."""
        if model is None:
            raise LdbfxError("LdbCallback(policy, ...) captures the Trainer's model, but Trainer passed "
                             "the callback none")
        pending = capturing_forward(model)
        if pending is None:
            if "_ldbfx_installed" in model.__dict__:
                raise LdbfxError("an ldbfx graph is already installed on this model: ldbfx.uninstall(model), "
                                 "or use LdbCallback(ldbfx.installed(model), policy, ...)")
            if "_original_forward" in model.__dict__:
                raise LdbfxError(
                    "LdbCallback(policy, ...) captures the Trainer's model on its first batch, beneath "
                    "the mixed-precision wrapper that train() puts on it, so it must be in place when "
                    "the Trainer is built: pass it in Trainer(callbacks=[...]), not add_callback()")
            install_on_first_call(model, self._captured, blocks=self._blocks(args), **self.transform_options)
            pending = capturing_forward(model)
        pending.disarm()  # an earlier train()'s capture (or another callback's): start afresh
        pending.on_capture, pending.options = self._captured, self.transform_options
        if any(type(m).__name__.startswith("FSDP") for m in model.modules()):
            raise LdbfxError(
                "the Trainer's model is already sharded (FSDP), and LdbCallback(policy, ...) captures it at "
                "its first batch, which a sharded model cannot give: install per block before building the "
                "Trainer, ldbfx.install(model, ldbfx.transform(model, example_kwargs=batch), blocks='auto', "
                "example_kwargs=batch), and pass LdbCallback(ldbfx.installed(model), policy, ...)")
        if pending.blocks is not None:  # hooks outside the blocks run; a block's capture refuses those inside
            pending.armed = True
            return
        hooked = [name for name, m in model.named_modules() if has_hooks(m)]
        if hooked:
            fixes = []
            if getattr(args, "neftune_noise_alpha", None) is not None:
                fixes.append("set neftune_noise_alpha=None (NEFTune hooks the input embeddings)")
            if any(getattr(m, "_require_grads_hook", None) is not None for m in model.modules()):
                fixes.append("call model.disable_input_require_grads() (it only serves reentrant "
                             "activation checkpointing, which ldbfx does not run)")
            fixes.append("remove the other hooks before training")
            raise LdbfxError(
                f"module(s) {', '.join(hooked[:5])} have forward or backward hooks, which the graph "
                f"captured from the first batch cannot run: {'; '.join(fixes)}")
        pending.armed = True

    def _captured(self, gm) -> None:
        """The one-line form's first training batch was captured into ``gm``: build the policy
        and begin the epoch that Trainer began before the batch."""
        self.gm = gm
        self._build_policy()
        if self._in_epoch and not self._resumed_in_epoch:
            self.policy.start_epoch(self._epoch)
        self._resumed_in_epoch = False

    def _build_policy(self) -> None:
        self.policy = self.policy_class(self.gm, self._optimizer, **self.policy_kwargs)
        state = self._trainer_state
        if state is not None and state.global_step > 0:
            self._resume(state)
        self._arm_allocation(state.global_step if state is not None else 0)

    def _arm_allocation(self, step: int) -> None:
        """Runs DropBP's sensitivity allocation on the next training batch once ``step`` reaches
        ``allocate_at`` of the run (unless a resumed state already holds it)."""
        if not self.allocates or self._allocate_step is None or step < self._allocate_step \
                or self.policy.allocation == "sensitivity":
            return
        routed = routed_forward(self._model)
        gm, policy, model = self.gm, self.policy, self._model
        if routed is None:  # per block: the model's own forward runs, through the block graphs
            self._allocation_hook = _before_next_call(
                model, lambda args, kwargs: policy.allocate(lambda: _loss(model(*args, **kwargs))))
        else:
            routed.before_call = lambda args, kwargs: policy.allocate(lambda: _loss(gm(*args, **kwargs)))
        self._allocate_step = None  # armed once

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._in_epoch = True
        if self.policy is None:  # one-line form: the capture at the first batch begins the epoch
            return
        if self._resumed_in_epoch:  # resumed mid-epoch: the loaded state holds this epoch's draws
            self._resumed_in_epoch = False
            return
        self.policy.start_epoch(self._epoch)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.policy is None:
            return
        # accelerate's optimizer says whether GradScaler skipped the step (inf/NaN): its
        # gradients are gone, and so must be its record of what the backward skipped.
        if getattr(optimizer, "step_was_skipped", False):
            discard_skipped(self.gm)
        self.policy.step()
        self._arm_allocation(state.global_step)
        if getattr(control, "should_save", False):  # Trainer writes the checkpoint right after us
            self._remember(state)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._epoch += 1
        self._in_epoch = False
        if self.policy is None:
            return
        self.policy.end_epoch()
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
        routed = routed_forward(self._model) if self._model is not None else None
        if routed is not None:
            routed.before_call = None
        if self._allocation_hook is not None:  # per block: an allocation still armed goes too
            self._allocation_hook.remove()
            self._allocation_hook = None
        remove = getattr(self.policy, "remove", None)
        if callable(remove):
            remove()
        pending = capturing_forward(self._model) if self._captures and self._model is not None else None
        if pending is not None:
            # The one-line form leaves the model with its own forward (self.gm stays for
            # inspection). Under accelerate's autocast wrapper the disarmed forward stays beneath
            # it, so evaluate() and predict() keep their autocast; without one, nothing stays.
            if "_original_forward" in self._model.__dict__:
                pending.disarm()
            else:
                uninstall(self._model)


#: The key of LdbCallback's entry in ``TrainerState.stateful_callbacks``. Not the class name:
#: Trainer's ``restore_callback_states_from_checkpoint`` rebuilds callbacks under their class
#: name from saved constructor arguments, which a graph and a policy class are not.
STATE_KEY = "ldbfx.LdbCallback"


def _before_next_call(model: torch.nn.Module, run):
    """Runs ``run(args, kwargs)`` once, eagerly, with the inputs of ``model``'s next call with
    gradients on (a pre-hook that removes itself before it runs)."""
    handle = None

    @torch._dynamo.disable
    def pre_hook(module, args, kwargs):
        if torch.is_grad_enabled():
            handle.remove()
            run(args, kwargs)

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return handle


def _loss(output: Any) -> torch.Tensor:
    """The loss a Hugging Face model returns (for the sensitivity allocation's closure)."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor) \
            and output[0].dim() == 0:
        loss = output[0]
    if loss is None:
        raise LdbfxError(
            "allocation='sensitivity' measures the model's loss on a training batch, but the model "
            "returned none (no labels in the batch, or Trainer computes the loss itself): give the "
            "batch labels, or use allocation='uniform'")
    return loss


def _transform_options() -> set[str]:
    from ..rewrite.driver import transform

    return set(inspect.signature(transform).parameters) - {"model", "example_args", "example_kwargs"}


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
