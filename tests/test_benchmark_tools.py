"""The helpers of ``benchmarks/compiled_path.py --processes`` (no model is run here)."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "compiled_path.py"


@pytest.fixture(scope="module")
def compiled_path():
    spec = importlib.util.spec_from_file_location("compiled_path", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_child_gets_the_arguments_without_the_parents_own(compiled_path):
    argv = ["--models", "resnet50", "--processes", "3", "--out=x.json", "--rounds", "20", "--rows-out", "r"]
    assert compiled_path._without(argv, "--processes", "--out", "--rows-out") == [
        "--models", "resnet50", "--rounds", "20"]


def test_an_abbreviated_option_is_refused(compiled_path):
    # A child given "--proc 3" would otherwise start three children of its own, and so on.
    with pytest.raises(SystemExit):
        compiled_path.main(["--proc", "3"])


def _process(compiled_path, rounds_ms):
    """One process's rows, as a child writes them."""
    row = compiled_path.summarize("m", 10, 3, {n: min(t) / 1e3 for n, t in rounds_ms.items()})
    row["rounds_ms"] = rounds_ms
    return [row]


def test_pooling_takes_each_variants_minimum_over_every_process(compiled_path):
    one = _process(compiled_path, {"baseline": [100.0, 104.0], "ideal": [90.0, 91.0],
                                   "ldbfx0": [101.0, 103.0], "ldbfx": [95.0, 93.0]})
    two = _process(compiled_path, {"baseline": [102.0, 98.0], "ideal": [92.0, 89.0],
                                   "ldbfx0": [99.0, 100.0], "ldbfx": [96.0, 94.0]})
    (row,) = compiled_path.pooled([one, two])
    assert row["ms"] == {"baseline": 98.0, "ideal": 89.0, "ldbfx0": 99.0, "ldbfx": 93.0}
    assert row["ldbfx_share_of_ideal"] == pytest.approx((98 - 93) / (98 - 89))
    assert row["ldbfx0_cost"] == pytest.approx(99 / 98 - 1)
    assert [p["ms"]["baseline"] for p in row["per_process"]] == [100.0, 98.0]
    lines = compiled_path.report([row])
    assert sum("alone (for information)" in line for line in lines) == 4
    assert lines[4] == "m, pooled over 2 processes (minimum per variant):"


def test_the_run_records_the_memory_settings_that_change_its_timings(compiled_path, monkeypatch):
    # A run under THP_MEM_ALLOC_ENABLE=1 was ~15% faster per step (2026-12-03); a result file
    # that did not say so could not be compared with the others.
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    monkeypatch.setenv("MALLOC_TOP_PAD_", "1073741824")
    monkeypatch.setenv("LDBFX_UNRELATED", "x")
    env = compiled_path._memory_env()
    assert env["THP_MEM_ALLOC_ENABLE"] == "1" and env["MALLOC_TOP_PAD_"] == "1073741824"
    assert "LDBFX_UNRELATED" not in env


def test_paired_medians_pair_each_round_with_itself(compiled_path):
    # The minima say ldbfx is 1 ms *faster* than the ideal (94 vs 95, from different rounds);
    # round by round it is 5 ms slower twice and 16 ms faster once: median +5 ms.
    rounds = {"baseline": [110.0, 100.0, 120.0], "ideal": [100.0, 95.0, 110.0],
              "ldbfx0": [111.0, 103.0, 119.0], "ldbfx": [105.0, 100.0, 94.0]}
    medians = compiled_path.paired_medians([rounds])
    assert medians == {"ldbfx0": 1.0, "ldbfx": 5.0}
    # Pooled over processes, differences of an even count take the mean of the middle two.
    other = {"baseline": [100.0], "ideal": [90.0], "ldbfx0": [100.0], "ldbfx": [92.0]}
    assert compiled_path.paired_medians([rounds, other]) == {"ldbfx0": 0.5, "ldbfx": 3.5}
    row = _process(compiled_path, rounds)[0]
    row["paired_median_ms"] = medians
    assert any("ldbfx minus ideal, median of the per-round differences +5.0 ms (for information; "
               "minima: -1.0 ms)" in line for line in compiled_path.report([row]))
