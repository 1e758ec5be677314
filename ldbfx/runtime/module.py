"""The module :func:`ldbfx.transform` returns: a ``GraphModule`` over the user's own modules."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from operator import attrgetter
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from ..capture.trace import autocast_state
from ..errors import LdbfxError
from ..records import Capture
from .state import LdbState

if TYPE_CHECKING:
    from ..records import Branch, Layer, TransformConfig

__all__ = ["LdbGraphModule", "MASK_ATTR", "STATE_ATTR", "CAPTURE_ATTR", "captured_from", "changes_since_capture",
           "recheck_modes"]


def _inside_ddp() -> bool:
    """True while a DistributedDataParallel forward is running (DDP marks itself on its class for
    the duration of its ``module(...)`` call, for Dynamo's DDP optimizer). One attribute read.
    FSDP2 and single-process runs never set it."""
    return torch.nn.parallel.DistributedDataParallel._active_ddp_module is not None


def _cuda_graph_capture_error() -> Exception:
    return LdbfxError(
        "an ldbfx-transformed model cannot run inside a manual CUDA-graph capture "
        "(torch.cuda.graph, torch.cuda.make_graphed_callables): each layer decides on the host, "
        "from the drop mask, which kernels to launch, so the graph would replay the layers dropped "
        "at capture time on every step and silently freeze the masks. Run it eagerly or with "
        "torch.compile, or capture the untransformed model")


#: Attribute holding the CPU bool mask (``True`` = layer dropped). A plain attribute, not a
#: buffer: ``.to("cuda")`` must leave it on the CPU, where reading it costs no device sync.
MASK_ATTR = "_ldbfx_mask"
#: Attribute holding the :class:`~ldbfx.state.LdbState`; the branch gates read it (``ops.branch``).
STATE_ATTR = "ldbfx_state"
#: Attribute holding the :class:`~ldbfx.records.Capture`.
CAPTURE_ATTR = "ldbfx_capture"


def _param_ref(model: nn.Module, qualified_name: str) -> tuple[nn.Module, str]:
    module_name, _, name = qualified_name.rpartition(".")
    return model.get_submodule(module_name), name


def _forward_of(graph: fx.Graph):
    """The generated ``forward`` of ``graph`` (an unbound function). Only the code is needed, so
    the throwaway module gets empty stand-ins for the attributes the graph reads."""
    stand_ins = {n.target: nn.Module() for n in graph.nodes if n.op in ("get_attr", "call_module")}
    return type(fx.GraphModule(stand_ins, graph)).forward


class LdbGraphModule(fx.GraphModule):
    """A transformed model: same computation, same parameters, maskable weight gradients.

    Its submodules, parameters and buffers *are* the original model's (not copies), so
    ``state_dict()`` has the same keys and an optimizer built on either trains both. When the
    model's train- and eval-mode traces differ (``self.training`` branches, ``F.dropout(...,
    training=self.training)``), it holds both graphs and runs the one of its current mode; ``code``
    shows the train-mode graph and ``eval_code`` the other.

    Per-model state lives in two attributes: ``ldbfx_capture``, the frozen
    :class:`~ldbfx.records.Capture` (layers, branches, config, what the capture fixed), and
    ``ldbfx_state``, the mutable :class:`~ldbfx.state.LdbState` (masks, what the last backward
    skipped, rows, modes). ``ldbfx_layers``, ``ldbfx_branches``, ``ldbfx_edges`` and
    ``ldbfx_config`` read the capture. The graph itself reads ``_ldbfx_mask`` and ``ldbfx_state``.

    Use :func:`ldbfx.transform` to create one.
    """

    def __init__(self, model: nn.Module, graph: fx.Graph, eval_graph: fx.Graph | None,
                 constants: dict[str, torch.Tensor], layers: tuple[Layer, ...],
                 edges: tuple[tuple[int, int], ...], config: TransformConfig,
                 attributes: dict[str, object] | None = None, branches: tuple[Branch, ...] = (),
                 branch_layers: tuple[tuple[int, ...], ...] = (), autocast: tuple | None = None):
        # (module, attribute) per parameter, not the Parameter objects: wrappers that swap a
        # module's parameters (FSDP2's fully_shard registers sharded DTensors in their place)
        # must find the parameters the optimizer holds now, not those seen at transform time.
        state = LdbState(tuple(tuple(_param_ref(model, p) for p in layer.params) for layer in layers),
                         branch_layers)
        mask = state.mask
        attributes = dict(attributes or {})
        modules = {k: v for k, v in attributes.items() if isinstance(v, nn.Module)}
        lookup = {**constants, **modules, MASK_ATTR: mask, STATE_ATTR: state}
        targets = {n.target for g in (graph, eval_graph) if g is not None for n in g.nodes
                   if n.op in ("get_attr", "call_module")}
        # An exported graph keeps the device and dtypes it was captured on (position ids made on
        # that device, masks in that dtype): one parameter, looked up at each eager call, tells
        # whether the model has moved since (.to(), .half(), Trainer moving it to its device).
        first = next(((module, name, p) for module in model.modules()
                      for name, p in module._parameters.items() if p is not None), None)
        # The model's own modules (gm adds torch.export's guard module): an exported graph runs
        # each of them in the mode it was captured in, which the next eager call checks.
        self.__dict__[CAPTURE_ATTR] = Capture(
            layers=layers, branches=branches, edges=edges, config=config, eval_graph=eval_graph,
            autocast=autocast, placement=None if first is None else (*first[:2], first[2].device, first[2].dtype),
            model_modules=tuple(m for name, m in model.named_modules() if name),
            snapshot=_captured(model),  # what changes_since_capture compares
            layer_index={layer.name: layer.index for layer in layers},
            branch_index={b.name: b.index for b in branches})  # read by recompile() during __init__
        super().__init__({t: lookup[t] if t in lookup else attrgetter(t)(model) for t in targets},
                         graph, class_name=type(model).__name__)
        # Adopt the model's own hierarchy, so nothing is copied and nothing is missing: unused
        # parameters and non-persistent buffers stay exactly as the model declares them.
        for name in list(self.__dict__):
            if name in lookup:
                del self.__dict__[name]
        self._modules.clear()
        self._modules.update(model._modules)
        self._parameters.clear()
        self._parameters.update(model._parameters)
        self._buffers.clear()
        self._buffers.update(model._buffers)
        self._non_persistent_buffers_set = set(model._non_persistent_buffers_set)
        for name, value in constants.items():  # moved by .to(), absent from state_dict
            self.register_buffer(name, value, persistent=False)
        for name, value in attributes.items():  # torch.export's guard module and pytree specs
            if name in modules:
                self._modules[name] = value  # no parameters or buffers: state_dict unchanged
            else:
                self.__dict__[name] = value
        self.training = model.training  # not .train(): children keep their own (maybe mixed) modes
        self.__dict__[MASK_ATTR] = mask  # what the graph's get_attr reads: the state's mask
        #: The run-time state (mask, skipped layers, rows, dense mode): :class:`ldbfx.state.LdbState`.
        self.__dict__[STATE_ATTR] = state

    @property
    def ldbfx_layers(self) -> tuple[Layer, ...]:
        """The layers in topological order (``ldbfx_capture.layers``; :func:`ldbfx.layers`)."""
        return self.__dict__[CAPTURE_ATTR].layers

    @property
    def ldbfx_branches(self) -> tuple[Branch, ...]:
        """The residual branches (``ldbfx_capture.branches``; :func:`ldbfx.branches`)."""
        return self.__dict__[CAPTURE_ATTR].branches

    @property
    def ldbfx_edges(self) -> tuple[tuple[int, int], ...]:
        """The layer DAG's edges (``ldbfx_capture.edges``; :func:`ldbfx.to_networkx`)."""
        return self.__dict__[CAPTURE_ATTR].edges

    @property
    def ldbfx_config(self) -> TransformConfig:
        """The options of :func:`ldbfx.transform` (``ldbfx_capture.config``)."""
        return self.__dict__[CAPTURE_ATTR].config

    def train(self, mode: bool = True):
        """Sets the training mode, except for modules pinned in eval mode (Learn&Drop's frozen
        prefix: its BatchNorm layers keep using, and stop updating, their running statistics)."""
        super().train(mode)
        state = self.__dict__.get(STATE_ATTR)  # None while GraphModule.__init__ runs
        if state is not None:
            for module in state.pinned_eval:
                module.train(False)
            state.modes_unchecked = True
        return self

    def recompile(self):
        """Regenerates ``forward``. Before the graph runs (eagerly), it switches the model to
        dense gradients the first time it runs inside DDP, refuses a CUDA-graph capture, and
        records the drops the eager ops are about to skip; then it runs the graph of the
        current mode (``self.training``) when there are two."""
        result = super().recompile()
        cls = type(self)
        train_forward = cls.forward
        capture = self.__dict__[CAPTURE_ATTR]
        eval_forward = train_forward if capture.eval_graph is None else _forward_of(capture.eval_graph)
        # An exported graph takes exactly its example batch's inputs (its placeholders' names).
        parameters = list(inspect.signature(train_forward).parameters.values())[1:]
        inputs = tuple(p.name for p in parameters)
        optional = frozenset(p.name for p in parameters if p.default is not p.empty)
        input_names = frozenset(inputs)

        @functools.wraps(train_forward)
        def forward(self, *args, **kwargs):
            capture = self.__dict__[CAPTURE_ATTR]
            if not torch.compiler.is_compiling():  # compiled: the backward records what it skips
                state = self.__dict__[STATE_ATTR]
                if state.dense_auto and _inside_ddp():
                    state.set_dense(True)  # for good: the model runs under DDP
                if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
                    raise _cuda_graph_capture_error()
                if torch.is_grad_enabled():  # eager ops read the mask now
                    state.record_forward()
                if capture.exported:  # torch.export graphs only
                    if kwargs.keys() != input_names:  # one set comparison; the details only then
                        error = _input_error(inputs, optional, args, kwargs)
                        if error is not None:
                            raise error
                    check_placement(self)
                    if capture.autocast != autocast_state():
                        raise _autocast_error(capture.autocast)
                    # Set by train()/eval(), which pass over the modules themselves; a loop
                    # that calls train() every step (Trainer does) pays a second such pass.
                    if state.modes_unchecked:
                        check_modes(self)
                        state.modes_unchecked = False
            elif capture.exported:
                check_modes(self)  # traced: Dynamo guards on the modes it read, and retraces
                check_placement(self)
            run = train_forward if self.training else eval_forward
            if not torch.is_grad_enabled() or torch.compiler.is_compiling():
                return run(self, *args, **kwargs)
            try:
                return run(self, *args, **kwargs)
            except BaseException:
                # A dropped branch runs without autograd until its gate (ops.branch_start): an
                # op raising in between must not leave the caller's autograd off.
                torch._C._set_grad_enabled(True)
                self.__dict__[STATE_ATTR].branch_off = None
                raise

        cls.forward = forward
        return result

    @property
    def eval_code(self) -> str:
        """Python code of the eval-mode graph (the same as ``code`` when the modes agree)."""
        eval_graph = self.__dict__[CAPTURE_ATTR].eval_graph
        return self.code if eval_graph is None else eval_graph.python_code(root_module="self").src

    def __deepcopy__(self, memo):
        # GraphModule.__deepcopy__ re-runs __init__ with its own signature; copy our state instead.
        result = type(self).__new__(type(self))
        memo[id(self)] = result
        # The state first: its copy brings a new mask (with its own id), which the graph's
        # get_attr must read in the copy, not a second copy of the old mask.
        state = copy.deepcopy(self.__dict__[STATE_ATTR], memo)
        memo[id(self.__dict__[MASK_ATTR])] = state.mask
        result.__dict__.update(copy.deepcopy(self.__dict__, memo))
        # The copy's modules are new objects: its capture snapshot names them, under the names
        # the original's had (gm's own modules, torch.export's guard, were never the model's);
        # the config's values are copied as they are.
        capture = result.__dict__[CAPTURE_ATTR]
        then, now = capture.snapshot, _captured(result)
        result.__dict__[CAPTURE_ATTR] = dataclasses.replace(capture, snapshot={
            **{key: {n: v for n, v in now[key].items() if n in then[key]}
               for key in ("modules", "parameters", "placement", "hooks")},
            "config": then["config"]})
        result.graph = result._graph  # re-owns the graph and regenerates forward
        return result

    def __reduce__(self):
        raise TypeError(
            "an ldbfx-transformed module cannot be pickled (torch.save(gm)); save "
            "gm.state_dict() instead: its keys are the original model's, so it loads into the "
            "untransformed architecture for inference"
        )


def check_placement(gm: LdbGraphModule) -> None:
    """Refuses to run an exported graph whose model moved to another device or dtype since the
    capture (one parameter's lookup: every call can afford it)."""
    capture = gm.__dict__[CAPTURE_ATTR]
    placement = capture.placement
    if placement is None or not capture.exported:
        return
    module, name, device, dtype = placement
    param = module._parameters.get(name)
    if param is not None and (param.device != device or param.dtype != dtype):
        raise LdbfxError(_PLACEMENT_FIX.format(
            what=f"its parameters are now on {param.device} in {param.dtype} (captured on {device} in {dtype})"))


_PLACEMENT_FIX = (
    "the model moved after ldbfx.transform: {what}, but the graph was captured by torch.export, "
    "which fixes the device and dtypes of what the model creates (position ids, attention "
    "masks), and would fail or run in the old ones. Move the model (model.to(device, dtype)) "
    "and the example batch before ldbfx.transform; Trainer then leaves it where it is. For mixed "
    "precision keep the weights as they are and capture under torch.autocast")


def recheck_modes(gm: LdbGraphModule) -> None:
    """Makes ``gm`` check its modules' train/eval modes (:func:`check_modes`) at its next eager
    call: to be called wherever the modes may have changed without ``gm.train()``."""
    gm.__dict__[STATE_ATTR].modes_unchecked = True


def check_modes(gm: LdbGraphModule) -> None:
    """Refuses to run an exported graph while some of the model's modules are in another
    train/eval mode than the whole: torch.export baked one mode into every module's code (dropout
    on, BatchNorm on batch statistics), so a module put in eval mode alone would silently still
    train. Costs a pass over the modules, so eager calls run it after a mode change, not every
    step; a compiled call runs it while tracing, and Dynamo's guards on the modes retrace."""
    mode = gm.training
    odd = [m for m in gm.__dict__[CAPTURE_ATTR].model_modules if m.training != mode]
    if odd:
        names = {id(m): name for name, m in gm.named_modules()}
        listed = ", ".join(repr(names.get(id(m), type(m).__name__)) for m in odd[:5])
        more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
        raise LdbfxError(
            f"module(s) {listed}{more} are in {'eval' if mode else 'train'} mode while the model "
            f"is in {'train' if mode else 'eval'} mode, but this graph was captured by "
            f"torch.export, which bakes the whole model's mode into every module (dropout, "
            f"BatchNorm statistics): they would silently run in {'train' if mode else 'eval'} "
            "mode. Put the whole model in one mode (model.train() or model.eval()). To keep part "
            "of a model in eval mode while training (frozen BatchNorm statistics), transform it "
            "with the FX front end (no example batch), which reads each module's mode as it runs")


def _input_error(inputs: tuple[str, ...], optional: frozenset[str], args: tuple, kwargs: dict) -> LdbfxError | None:
    """The error for a call of an exported graph with other inputs than its example batch's, or
    None where the call binds (inputs given by position)."""
    given = set(inputs[:len(args)]) | set(kwargs)
    unexpected = sorted(set(kwargs) - set(inputs))
    missing = [name for name in inputs if name not in given and name not in optional]
    if not (unexpected or missing or len(args) > len(inputs)):
        return None
    called = " and ".join(part for part in (
        f"with {', '.join(unexpected)}" if unexpected else "",
        f"without {', '.join(missing)}" if missing else "",
        f"with {len(args)} positional inputs" if len(args) > len(inputs) else "") if part)
    return LdbfxError(
        f"this graph was captured by torch.export from an example batch with the inputs "
        f"{', '.join(inputs)}, and takes exactly those; it was called {called}. An exported graph "
        "computes with what its example batch held, nothing else. Capture from a batch shaped like "
        "the training batches (ldbfx.transform(model, example_kwargs=batch) with your collator's "
        "output: attention_mask and labels included where training passes them), or call it with "
        "the same inputs")


def _autocast_error(captured: tuple) -> LdbfxError:
    def say(state):
        on = [f"{device} {str(dtype).removeprefix('torch.')}" for device, dtype in zip(("cpu", "cuda"), state) if dtype]
        return f"autocast ({', '.join(on)})" if on else "no autocast"

    return LdbfxError(
        f"this graph was captured by torch.export under {say(captured)} and now runs under "
        f"{say(autocast_state())}: an exported graph fixes the dtypes it saw, so it would fail on "
        "(or compute in) other ones. Capture under the autocast you train with: "
        "with torch.autocast(device, dtype): gm = ldbfx.transform(model, example_kwargs=batch) "
        "(for Hugging Face's Trainer(bf16=True) too)")


# Config entries save_pretrained and from_pretrained write, which no forward reads, and use_cache,
# which the capture turns off for the training graph whatever the config says (ldbfx/capture/export.py).
_CONFIG_METADATA = {"architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "_commit_hash",
                    "use_cache"}
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _captured(model: nn.Module) -> dict:
    """What a graph is captured from and cannot follow when it changes afterwards: which module
    object sits under each name, which hooks each carries, and a Hugging Face config's values.
    The root is left out: its hooks run around the routed ``forward``."""
    named = [(name, m) for name, m in model.named_modules() if name]
    config = getattr(model, "config", None)
    return {"modules": {name: id(m) for name, m in named},
            "parameters": {name: (id(p), tuple(p.shape)) for name, p in model.named_parameters()},
            "placement": {name: (p.device, p.dtype) for name, p in model.named_parameters()},
            "hooks": {name: tuple(tuple(getattr(m, d, {})) for d in _HOOK_DICTS) for name, m in named},
            "config": copy.deepcopy(config.to_dict()) if callable(getattr(config, "to_dict", None)) else None}


def captured_from(gm: LdbGraphModule, model: nn.Module) -> bool:
    """Whether ``gm`` was captured from ``model`` (they share a module object), changed since or not."""
    captured = set(gm.__dict__[CAPTURE_ATTR].snapshot["modules"].values())
    return any(id(m) in captured for m in model.modules())


def changes_since_capture(gm: LdbGraphModule, model: nn.Module) -> list[str]:
    """How ``model`` changed since ``gm`` was captured from it, in ways the graph would silently
    not follow: modules or parameters replaced, modules added (``resize_token_embeddings``, PEFT
    adapters), hooks added to a module that had none (Trainer's NEFTune), config values changed
    (Trainer's pad token alignment). Empty when nothing did. O(modules): for :func:`ldbfx.install` and the
    Trainer callback, not for every step."""
    then, now = gm.__dict__[CAPTURE_ATTR].snapshot, _captured(model)
    replaced = [n for n, i in then["modules"].items() if now["modules"].get(n, i) != i]
    swapped = [n for n, i in then["parameters"].items() if now["parameters"].get(n, i) != i]
    removed = [n for n in then["modules"] if n not in now["modules"]]
    added = [n for n in now["modules"] if n not in then["modules"]]
    hooked = [n for n, hooks in now["hooks"].items()
              if n in then["hooks"] and not any(then["hooks"][n]) and any(hooks)]
    exported = gm.__dict__[CAPTURE_ATTR].exported  # only torch.export graphs fix the device and dtypes
    moved = [n for n, place in then.get("placement", {}).items()
             if exported and now["placement"].get(n, place) != place]
    config = sorted(k for k in set(then["config"] or {}) | set(now["config"] or {})
                    if k not in _CONFIG_METADATA and (then["config"] or {}).get(k) != (now["config"] or {}).get(k))
    found = []
    for what, names in (("modules replaced", replaced), ("modules removed", removed),
                        ("modules added", added), ("parameters replaced or resized", swapped)):
        if names:
            found.append(f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    if moved:
        device, dtype = now["placement"][moved[0]]
        found.append(_PLACEMENT_FIX.format(
            what=f"{', '.join(moved[:3])}{' ...' if len(moved) > 3 else ''} are now on {device} in {dtype} "
                 f"(captured on {then['placement'][moved[0]][0]} in {then['placement'][moved[0]][1]})"))
    if hooked:
        found.append(f"hooks added to {', '.join(hooked[:5])} (Trainer's neftune_noise_alpha adds one to "
                     "the input embeddings)")
    if config:
        tokens = {"pad_token_id", "bos_token_id", "eos_token_id"} & set(config)
        found.append(f"config values changed: {', '.join(config[:8])}" + (
            " (Trainer aligns the token ids with its processing_class's)" if tokens else ""))
    return found
