"""The ldbfx command: help texts, inspect, a tiny demo, clear data errors."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ldbfx.app.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", ["demo", "train", "inspect", "bench"])
def test_help_lists_defaults(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "default:" in text and "--" in text


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "ldbfx", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "inspect" in out.stdout


def test_the_command_without_the_app_extra_says_what_to_install(monkeypatch, capsys):
    # `pip install ldbfx` is the library alone; the command's own dependencies are the app extra.
    import ldbfx.app.cli as cli

    monkeypatch.setattr(cli, "APP_MODULES", cli.APP_MODULES + ("ldbfx_no_such_module",))
    assert main(["inspect", "resnet18"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "ldbfx_no_such_module" in err and "pip install 'ldbfx[app]'" in err


def test_the_library_needs_none_of_the_app_extra():
    # The library's modules import no application dependency, at any depth (the app folder may).
    # ldbfx.hf is left out: transformers itself depends on tqdm.
    # torch itself imports some where they are installed (tqdm, here): those are not counted.
    from ldbfx.app.cli import APP_MODULES  # read here: importing it in the child imports ldbfx

    code = (f"import sys, torch; APP_MODULES = {APP_MODULES!r}; "
            "before = {m for m in APP_MODULES if m in sys.modules}; "
            "import ldbfx, ldbfx.inspect, ldbfx.distributed, ldbfx.export, ldbfx.policies; "
            "print(sorted(m for m in APP_MODULES if m in sys.modules and m not in before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_inspect_prints_the_table_and_writes_dot(tmp_path, capsys):
    dot = tmp_path / "layers.dot"
    assert main(["inspect", "resnet18", "--input-size", "32", "--dot", str(dot)]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "dW share" in out and "layer DAG: 41 nodes" in out
    text = dot.read_text()
    assert text.startswith("digraph layers") and "0 -> 1;" in text


def test_tiny_demo_writes_plot_and_json(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--epochs", "3", "--max-steps", "2", "--batch-size", "16", "--no-progress",
                 "--dropbp", "--out", str(out)]) == 0
    figures = json.loads((out / "demo.json").read_text())
    assert set(figures["train_time"]) == {"baseline", "ldb", "dropbp"}
    assert [r["mode"] for r in figures["ldb"]] == ["full", "full", "drop"]
    # DropBP drops whole branches at every step: each epoch skips some backward FLOPs (6 eligible
    # branches at p = 0.5 over 2 steps: all kept has probability 2**-12), never all of them.
    assert all(0 < r["bwd_flops_skipped"] < 1 for r in figures["dropbp"])
    assert (out / "demo.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "speed-up, controlled estimate" in printed and "from skipped dW" in printed
    assert ["baseline", "LayerDropBack", "DropBP"] in [line.split() for line in printed.splitlines()]


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--data", "cifar10", "--data-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and "never downloads" in err


def test_bench_runs_and_checks_flops(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "resnet18", "--resolution", "32", "--batch", "2", "--steps", "1",
                 "--rounds", "1", "--warmup", "0", "--fractions", "0", "0.5", "--no-compile",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    half = data["rows"][1]
    assert half["flops_ldbfx"] == half["flops_ideal"] < half["flops_baseline"]
    assert "resnet18 @ 0.5: FLOPs saved" in capsys.readouterr().out

    # benchmarks/report.py makes the docs table from it, also when only some fractions were timed
    # compiled (--compiled-fractions, as benchmarks/gpu.sh runs it): here the first row, its eager
    # figures standing in for compiled ones.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import report
    finally:
        sys.path.pop(0)
    data["rows"][0].update({k.replace("eager_", "compiled_"): v for k, v in data["rows"][0].items()
                            if k.startswith("eager_")})
    out.write_text(json.dumps(data))
    lines = report.table(str(out)).splitlines()
    rows = [line for line in lines if line.startswith("| resnet18")]
    assert "compiled s/step base" in lines[2] and len(rows) == 2
    assert rows[1].endswith("| not timed | not timed |") and "not timed" not in rows[0]


@pytest.mark.parametrize("policy, options, check", [
    ("cdb", ["--cdb-schedule", "milestones", "--milestones", "1", "--channel-rate", "0.4"],
     lambda rows: [r["channel_rate"] for r in rows] == [0.0, 0.4]),
    ("learn-and-drop", ["--warmup-epochs", "0", "--cache", "memory"],
     lambda rows: all("frozen_layers" in r for r in rows)),
])
def test_train_with_sibling_policies(policy, options, check, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--policy", policy, *options, "--epochs", "2", "--max-steps", "2", "--batch-size", "16",
                 "--no-progress", "--out", str(out)]) == 0
    rows = json.loads((out / "log.json").read_text())["history"]
    assert len(rows) == 2 and check(rows)
    assert "final test accuracy" in capsys.readouterr().out


# Bad input as a new user types it: one line `ldbfx CMD: error: ...` naming the fix, exit 2, no
# traceback, and nothing loaded or built first (each case is refused before data or a model exist).
BAD_INPUT = [
    (["inspect", "not_a_model"], "ldbfx inspect: error: unknown model 'not_a_model'"),
    (["train", "--model", "not_a_model"], "ldbfx train: error: unknown model 'not_a_model'"),
    (["train", "--drop-rate", "1.5"], "ldbfx train: error: argument --drop-rate: must be in [0.0, 1.0), got 1.5"),
    (["train", "--kappa", "0"], "ldbfx train: error: argument --kappa: must be >= 1.0, got 0"),
    (["train", "--batch-size", "0"], "ldbfx train: error: argument --batch-size: must be >= 1, got 0"),
    (["train", "--batch-size", "many"], "ldbfx train: error: argument --batch-size: expected an integer"),
    (["train", "--resume", "/nonexistent/ckpt.pt"], "ldbfx train: error: --resume /nonexistent/ckpt.pt: no such checkpoint"),
    (["bench", "not_a_model"], "ldbfx bench: error: unknown model 'not_a_model'"),
    (["bench", "resnet18", "--fractions", "0", "0.3", "--compiled-fractions", "0.5"],
     "ldbfx bench: error: --compiled-fractions [0.5] are not among --fractions [0.0, 0.3]"),
    (["bench", "resnet18", "--fractions", "0", "-0.3", "1.5"],  # a negative one dropped the wrong layers
     "ldbfx bench: error: fractions must lie in [0, 1], got [-0.3, 1.5]"),
    (["bench", "resnet18", "--no-compile", "--compiled-fractions", "0"],
     "ldbfx bench: error: --compiled-fractions needs the compiled measurements (drop --no-compile)"),
    (["train", "--device", "cuda:7"], "ldbfx train: error: --device cuda:7: this machine has"),
    (["train", "--device", "gpu"], "ldbfx train: error: --device 'gpu' is not a torch device"),
    (["demo", "--epochs", "0"], "ldbfx demo: error: argument --epochs: must be >= 1, got 0"),
    (["train", "--data", "cifar10", "--data-dir", "/nonexistent"], "ldbfx train: error: "),
]


def _exit_code(argv) -> int:
    """main's return value, or the status argparse exits with."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("argv, start", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(argv, start, capfd, monkeypatch):
    import torch

    import ldbfx.app.train

    if argv[-1] == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built or data loaded before the input was checked")

    monkeypatch.setattr(ldbfx.app.train, "build_model", refuse)
    if "--data" not in argv:  # the dataset check is the loader's own
        monkeypatch.setattr(ldbfx.app.train.datasets, "load", refuse)
    assert _exit_code(argv) == 2
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), err
    assert "Traceback" not in err and out == ""


def test_bad_input_from_the_shell_has_no_traceback():
    run = subprocess.run([sys.executable, "-m", "ldbfx", "train", "--model", "not_a_model"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().startswith("ldbfx train: error: unknown model") and "Traceback" not in run.stderr


def test_demo_dropbp_refuses_a_model_without_branches_before_training(capfd, monkeypatch):
    import ldbfx.app.train

    def refuse(*args, **kwargs):
        raise AssertionError("trained before the input was checked")

    monkeypatch.setattr(ldbfx.app.train, "train", refuse)
    assert _exit_code(["demo", "--model", "squeezenet1_0", "--dropbp"]) == 2
    out, err = capfd.readouterr()
    assert err.strip() == ("ldbfx demo: error: --dropbp: squeezenet1_0 has no droppable residual branch "
                           "(0 found, none eligible); see `ldbfx inspect squeezenet1_0`")


@pytest.mark.parametrize("argv, rate", [(["--policy", "dropbp"], 0.5), (["--policy", "ldb"], 0.3),
                                        (["--policy", "dropbp", "--drop-rate", "0.2"], 0.2)])
def test_the_drop_rate_defaults_to_each_policys_own(argv, rate, monkeypatch, tmp_path):
    # DropBP's default is 0.5 (the paper's, and ldbfx.DropBP's); LayerDropBack's is 0.3.
    import ldbfx.app.train

    seen = {}

    def capture(config, **kwargs):
        seen["config"] = config
        return SimpleNamespace(history=[], train_time=0.0, final_accuracy=0.0)

    monkeypatch.setattr(ldbfx.app.train, "train", capture)
    assert main(["train", "--data", "digits", "--model", "resnet18", "--out", str(tmp_path), *argv]) == 0
    assert seen["config"].drop_rate == rate
