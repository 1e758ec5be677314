"""The ``ldbfx`` command: ``demo``, ``train``, ``inspect``, ``bench``. ``ldbfx CMD --help`` for options."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


class UsageError(Exception):
    """Bad input on the command line: printed as one line, ``ldbfx CMD: error: ...``, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block) and a pointer to ``--help``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, low=None, high=None, *, low_open=False, high_open=False):
    """An argparse type: ``kind(value)`` within ``[low, high]`` (``(``/``)`` where open)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            lo = "" if low is None else f"{'(' if low_open else '['}{low}"
            hi = "" if high is None else f"{high}{')' if high_open else ']'}"
            rule = f"in {lo}, {hi}" if low is not None and high is not None else (
                f"{'>' if low_open else '>='} {low}" if low is not None else f"{'<' if high_open else '<='} {high}")
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_POSITIVE_INT = _number(int, 1)
_FRACTION = _number(float, 0.0, 1.0)


def check_model_name(name: str) -> None:
    """Raises :class:`UsageError` unless ``name`` is a torchvision classification or timm model."""
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return
    import timm

    if name in timm.list_models():
        return
    import difflib

    known = list(dict.fromkeys(torchvision.models.list_models(module=torchvision.models) + timm.list_models()))
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models() or timm.list_models()"
    raise UsageError(f"unknown model {name!r}: not a torchvision classification model nor a timm model; {hint}")


def _require(package: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise UsageError(f"{what} needs {package}: pip install 'ldbfx[hf]'")


def check_device(device: str) -> None:
    """Raises :class:`UsageError` unless ``device`` names a device this machine has."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {device}: this machine has no CUDA device; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: only cpu, cuda and mps are supported")


def _check_run(args) -> None:
    """What can be checked before any data is loaded or a model built."""
    check_device(args.device)
    if getattr(args, "resume", None) and not os.path.isfile(args.resume):
        raise UsageError(f"--resume {args.resume}: no such checkpoint file; pass the path given to --checkpoint")
    check_model_name(args.model)


def _lr_scale(value: str):
    if value in ("kappa", "none"):
        return None
    if value == "inverse_keep":
        return value
    return float(value)


#: --drop-rate's default per policy: each policy class's own default.
LDB_DROP_RATE, DROPBP_DROP_RATE = 0.3, 0.5


def _add_policy_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LayerDropBack policy")
    g.add_argument("--drop-rate", type=_number(float, 0.0, 1.0, high_open=True), default=None,
                   help="probability that an eligible layer's weight gradient is skipped at a DROP-epoch step "
                        f"({LDB_DROP_RATE}; with --policy dropbp, a branch's backward at a step: {DROPBP_DROP_RATE}, "
                        "DropBP's own default)")
    g.add_argument("--period", type=_POSITIVE_INT, default=2, help="every PERIOD-th epoch (from epoch PERIOD on) is a DROP epoch")
    g.add_argument("--kappa", type=_number(float, 1.0), default=2.0, help="batch-size factor in DROP epochs")
    g.add_argument("--lr-scale", type=_lr_scale, default=None,
                   help="LR factor in DROP epochs: a number, 'kappa' (default) or 'inverse_keep' (1/(1-drop_rate))")
    g.add_argument("--resample", choices=["step", "epoch"], default="step",
                   help="draw new layers every optimizer step or once per epoch")
    g = p.add_argument_group("ChannelDropBack policy (--policy cdb)")
    g.add_argument("--layer-rate", type=_number(float, 0.0, 1.0, low_open=True), default=1.0,
                   help="'one': probability that a step selects a layer; 'independent': each layer's probability")
    g.add_argument("--channel-rate", type=_FRACTION, default=0.5,
                   help="(final) probability that a channel of a selected layer is frozen")
    g.add_argument("--cdb-schedule", choices=["fixed", "milestones", "ramp"], default="fixed",
                   help="channel-rate schedule: from the start, raised at each milestone, or a linear ramp")
    g.add_argument("--milestones", type=_POSITIVE_INT, nargs="*", default=[], help="epochs of the milestones/ramp schedules")
    g.add_argument("--cdb-dim", type=int, choices=[0, 1], default=0, help="0: output channels, 1: input channels")
    g.add_argument("--cdb-selection", choices=["one", "independent"], default="one",
                   help="one layer per step (paper) or every layer independently (authors' code)")
    g = p.add_argument_group("DropBP policy (--policy dropbp; --drop-rate is the branches' rate)")
    g.add_argument("--dropbp-allocation", choices=["uniform", "sensitivity"], default="uniform",
                   help="every branch at --drop-rate, or rates allocated by gradient sensitivity at 10%% of "
                        "the epochs for the same FLOPs")
    g = p.add_argument_group("Learn&Drop policy (--policy learn-and-drop)")
    g.add_argument("--warmup-epochs", type=_number(int, 0), default=2, help="epochs before the first freezing decision")
    g.add_argument("--cache", choices=["memory", "disk"], default=None,
                   help="cache the frozen prefix's outputs per sample (deterministic data only)")


def _add_run_options(p: argparse.ArgumentParser, *, epochs: int, batch_size: int) -> None:
    p.add_argument("--model", default="resnet18", help="a torchvision or timm model name")
    p.add_argument("--image-size", type=_POSITIVE_INT, default=32, help="input resolution")
    p.add_argument("--epochs", type=_POSITIVE_INT, default=epochs, help="number of epochs")
    p.add_argument("--batch-size", type=_POSITIVE_INT, default=batch_size, help="batch size of full epochs")
    p.add_argument("--lr", type=_number(float, 0.0, low_open=True), default=0.05, help="base learning rate (SGD, Nesterov, cosine schedule)")
    p.add_argument("--compile", action="store_true", help="train with torch.compile")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast dtype (default: fp32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, init and drop masks")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--max-steps", type=_POSITIVE_INT, default=None, help="cap steps per epoch (quick smoke runs)")
    p.add_argument("--allreduce-dropped", dest="skip_dropped_allreduce", action="store_false",
                   help="under torchrun, all-reduce dropped layers' (zero) gradients too, as plain DDP does")
    _add_policy_options(p)


def _config(args, **overrides):
    from .train import TrainConfig

    fields = dict(
        model=args.model, image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, compile=args.compile, amp=args.amp, device=args.device, seed=args.seed,
        progress=args.progress, period=args.period, kappa=args.kappa,
        drop_rate=args.drop_rate if args.drop_rate is not None else (
            DROPBP_DROP_RATE if overrides.get("policy") == "dropbp" else LDB_DROP_RATE),
        lr_scale=args.lr_scale, resample=args.resample, layer_rate=args.layer_rate,
        channel_rate=args.channel_rate, cdb_schedule=args.cdb_schedule, milestones=tuple(args.milestones),
        cdb_dim=args.cdb_dim, cdb_selection=args.cdb_selection, warmup_epochs=args.warmup_epochs,
        cache=args.cache, max_steps_per_epoch=args.max_steps, dropbp_allocation=args.dropbp_allocation,
        skip_dropped_allreduce=args.skip_dropped_allreduce,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def _check_branches(model: str) -> None:
    """--dropbp: refused before any training when the model has no droppable residual branch."""
    import warnings

    import torch

    from ..analysis.branches import branches
    from ..rewrite.driver import transform
    from .train import build_model

    with warnings.catch_warnings(), torch.device("meta"):  # the structure only: no weights allocated
        warnings.simplefilter("ignore")
        records = branches(transform(build_model(model, 10)))
    if not any(b.eligible for b in records):
        raise UsageError(f"--dropbp: {model} has no droppable residual branch "
                         f"({len(records)} found, none eligible); see `ldbfx inspect {model}`")


#: Options of the vision demo that the language-model demo does not take (refused, not ignored).
_VISION_ONLY = ("model", "image_size", "epochs", "batch_size", "compile", "amp", "device", "max_steps",
                "period", "kappa", "lr_scale", "resample", "dropbp_allocation")


def _lm_demo(args, parser_defaults: dict) -> int:
    given = [name for name in _VISION_ONLY if getattr(args, name) != parser_defaults[name]]
    if given:
        raise UsageError(f"--task lm does not take {', '.join('--' + g.replace('_', '-') for g in given)} "
                         "(it races the baseline and DropBP for --budget seconds each, eager, on CPU)")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UsageError("--task lm needs Hugging Face transformers: pip install -e \".[hf]\"") from None
    from .demo_lm import run_lm_demo

    run_lm_demo(budget_s=args.budget, lr=args.lr if args.lr is not None else 2e-3,
                dropbp_rate=args.dropbp if args.dropbp is not None else 0.5, seed=args.seed, out_dir=args.out)
    return 0


def _demo(args) -> int:
    if args.task == "lm":
        return _lm_demo(args, vars(build_parser().parse_args(["demo"])))
    from .demo import run_demo

    if args.budget != build_parser().parse_args(["demo"]).budget:
        raise UsageError("--budget applies to --task lm (the vision demo trains for --epochs)")
    if args.lr is None:
        args.lr = 0.05
    _check_run(args)

    if args.dropbp is not None:
        _check_branches(args.model)
    run_demo(_config(args, data="digits"), out_dir=args.out, dropbp_rate=args.dropbp)
    return 0


def _train(args) -> int:
    from .train import train

    _check_run(args)
    config = _config(args, data=args.data, data_dir=args.data_dir, policy=args.policy, out_dir=args.out,
                     checkpoint=args.checkpoint, resume=args.resume)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 prints

    def report(row):
        if main_rank:
            print(f"epoch {row['epoch']:>3} {row['mode']:>4}  batch {row['batch_size']:>4}  "
                  f"loss {row['train_loss']:.4f}  acc {100 * row['test_acc']:.2f}%  {row['epoch_time']:.1f}s",
                  flush=True)

    result = train(config, on_epoch=report)
    if main_rank:
        print(f"trained {len(result.history)} epochs in {result.train_time:.1f}s; "
              f"final test accuracy {100 * result.final_accuracy:.2f}%; log in {args.out}/log.json")
    return 0


def _inspect(args) -> int:
    import torch

    from ..integrations import inspection as ins
    from ..rewrite.driver import transform
    from .train import build_model

    if args.model.startswith("hf:"):  # a tiny random Hugging Face model, captured by torch.export
        _require("transformers", "ldbfx inspect hf:...")
        from ..integrations.hf import tiny_model

        model, batch = tiny_model(args.model[3:])
        gm = transform(model, keep_first=args.keep_first, keep_last=args.keep_last, example_kwargs=batch)
        ins.summary(gm, **batch)
    else:
        check_model_name(args.model)
        model = build_model(args.model, args.num_classes)
        gm = transform(model, keep_first=args.keep_first, keep_last=args.keep_last)
        x = torch.randn(2, 3, args.input_size, args.input_size)
        ins.summary(gm, x)
    graph = ins.to_networkx(gm)
    print(f"layer DAG: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges"
          f"{'; train and eval graphs differ' if gm.eval_code != gm.code else ''}")
    if args.code:
        print(gm.code)
    if args.dot:
        with open(args.dot, "w") as f:
            f.write("digraph layers {\n  node [shape=box, fontsize=10];\n")
            for i, attrs in graph.nodes(data=True):
                style = "" if attrs["eligible"] else ", style=filled, fillcolor=lightgrey"
                f.write(f'  {i} [label="{i}: {attrs["name"]}\\n{attrs["type"]}"{style}];\n')
            for a, b in graph.edges:
                f.write(f"  {a} -> {b};\n")
            f.write("}\n")
        print(f"wrote {args.dot} (render with: dot -Tpng {args.dot} -o layers.png)")
    return 0


def _bench(args) -> int:
    from .bench import argument_problem, run

    problem = argument_problem(args)
    if problem:
        raise UsageError(problem)
    check_device(args.device)
    for name in args.models:
        check_model_name(name)
    run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = _Parser(prog="ldbfx", formatter_class=fmt,
                                     description="Skip chosen layers' weight gradients (LayerDropBack) with a torch.fx pass.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", formatter_class=fmt,
                       help="baseline vs LayerDropBack on the embedded digits dataset (no download)",
                       description="Trains the model twice on scikit-learn's embedded handwritten digits "
                                   "(same seed): baseline, then LayerDropBack. Prints a side-by-side table, "
                                   "writes demo.png and demo.json.")
    p.add_argument("--task", choices=["vision", "lm"], default="vision",
                   help="vision: ResNet-18 on digits, baseline vs LayerDropBack by epochs; lm: a byte-level "
                        "Llama on the standard library's source, baseline vs DropBP for the same time "
                        "(needs the hf extra)")
    p.add_argument("--budget", type=_number(float, 0.0, low_open=True), default=20.0,
                   help="--task lm: seconds of training each run gets")
    _add_run_options(p, epochs=8, batch_size=64)
    _lr = next(a for a in p._actions if a.dest == "lr")  # noqa: SLF001 - one default per task
    # "%(default).0s" prints nothing: the help states both defaults instead of "None".
    _lr.default, _lr.help = None, "peak learning rate: 0.05 (SGD) for vision, 2e-3 (AdamW) for --task lm%(default).0s"
    p.add_argument("--dropbp", type=_number(float, 0.0, 1.0, high_open=True), nargs="?", const=0.5, default=None, metavar="RATE",
                   help="vision: also train with DropBP (every eligible residual branch dropped whole with "
                        "probability RATE, default 0.5, at every step) and show it beside LDB; "
                        "--task lm: DropBP's rate (default 0.5)%(default).0s")
    p.add_argument("--out", default="ldbfx-out", help="output directory for the plot and JSON")
    p.set_defaults(func=_demo)

    p = sub.add_parser("train", formatter_class=fmt, help="train on your data with a policy (or none)")
    p.add_argument("--data", choices=["digits", "cifar10", "cifar100", "imagefolder"], default="digits",
                   help="dataset; all but digits read local files from --data-dir (never downloaded)")
    p.add_argument("--data-dir", default=None, help="where the dataset's files are")
    p.add_argument("--policy", choices=["none", "ldb", "cdb", "learn-and-drop", "dropbp"], default="ldb",
                   help="training policy: LayerDropBack, ChannelDropBack, Learn&Drop or DropBP (branch drop)")
    _add_run_options(p, epochs=10, batch_size=64)
    p.add_argument("--out", default="ldbfx-out", help="directory for log.json and log.csv")
    p.add_argument("--checkpoint", default=None, help="save model/optimizer/scheduler/policy here every epoch")
    p.add_argument("--resume", default=None, help="resume from this checkpoint")
    p.set_defaults(func=_train)

    p = sub.add_parser("inspect", formatter_class=fmt, help="the layer table and graph of a model")
    p.add_argument("model", help="a torchvision or timm model name, or hf:<model_type> (a tiny random "
                                 "Hugging Face model: hf:llama, hf:bert, hf:gpt2, hf:vit)")
    p.add_argument("--num-classes", type=_POSITIVE_INT, default=1000, help="classifier width")
    p.add_argument("--input-size", type=_POSITIVE_INT, default=224, help="input resolution for the FLOP column")
    p.add_argument("--keep-first", type=_number(int, 0), default=4, help="first layers that always train")
    p.add_argument("--keep-last", type=_number(int, 0), default=1, help="last layers that always train")
    p.add_argument("--code", action="store_true", help="print the rewritten graph's code")
    p.add_argument("--dot", default=None, help="write the layer DAG for Graphviz to this file")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("bench", formatter_class=fmt,
                       help="backward FLOPs and step times vs the requires_grad ideal, at drop fractions")
    from .bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=_bench)
    return parser


#: What the command imports beyond the library: the ``app`` extra (pyproject.toml), by module name.
APP_MODULES = ("torchvision", "timm", "sklearn", "matplotlib", "tqdm", "networkx")


def missing_app_modules() -> list[str]:
    """The modules of :data:`APP_MODULES` that are not installed (none are imported)."""
    import importlib.util

    return [name for name in APP_MODULES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    from ..errors import LdbfxError

    args = build_parser().parse_args(argv)
    missing = missing_app_modules()
    if missing:
        # `pip install ldbfx` installs the library alone: say what the command needs, in one line.
        print(f"ldbfx {args.command}: error: the ldbfx command needs the app extra (missing: "
              f"{', '.join(missing)}): pip install 'ldbfx[app]'", file=sys.stderr)
        return 2
    from .data import DataError

    try:
        return args.func(args)
    except (UsageError, DataError, LdbfxError) as error:
        # Input the user can fix (checked up front where possible): one line, no traceback.
        # Anything else is a bug in ldbfx and keeps its traceback.
        print(f"ldbfx {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
