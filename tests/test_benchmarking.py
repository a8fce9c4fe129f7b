"""The bench package without timing anything long: statistics, the report, the record's commit
(from the build, not from the current directory), the plot, and setup.py's commit stamp."""

import importlib.util
import pathlib
import runpy
import subprocess

import pytest
import torch

import mhr_ops
from mhr_ops import benchmarking
from mhr_ops.benchmarking import Result, ShapeSet, Stat

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_stat_and_per_rep_ratio():
    s = Stat.of([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (s.median, s.q1, s.q3, s.min, s.max, s.n) == (3.0, 2.0, 4.0, 1.0, 100.0, 5)
    samples = {"a": [2.0, 4.0, 6.0], "b": [1.0, 2.0, 3.0]}
    assert benchmarking.per_rep_ratio(samples, "a", "b").median == 2.0
    assert benchmarking.per_rep_difference(samples, "a", "b").median == 2.0


def fake_result() -> Result:
    r = Result("fake", "eval N=1", {"N": 1}, "bare", {"bare": [10.0, 11.0, 12.0], "mhr_ops": [12.0, 14.0, 13.0]})
    r.ratio("mhr_ops", "bare", target=1.3)
    r.difference("mhr_ops", "bare")
    return r


def test_table_shows_spread_targets_and_status():
    text = benchmarking.format_shape_set(ShapeSet("fake", "serve", "a fake set"), [fake_result()])
    assert "== fake: a fake set" in text and "median [q1 - q3]" in text
    assert "mhr_ops / bare" in text and "<= 1.3x" in text and "met" in text
    assert "mhr_ops - bare" in text and " us" in text


def test_time_side_by_side_interleaves_in_shuffled_order_and_keeps_samples():
    """Every rep calls each implementation once with the rep's index, in a shuffled order: over
    the reps each implementation follows each other (a rotation of one order would keep the same
    neighbours), and the order repeats from run to run."""

    def run():
        calls = []
        fns = {name: (lambda i, name=name: calls.append((name, i))) for name in "abcd"}
        samples = benchmarking.time_side_by_side(fns, device=torch.device("cpu"), reps=60, warmup=0)
        assert [len(v) for v in samples.values()] == [60] * 4
        return calls

    calls = run()
    assert [i for _, i in calls] == [i for i in range(60) for _ in range(4)]  # one rep's calls share an index
    reps = [[name for name, _ in calls[4 * i : 4 * i + 4]] for i in range(60)]
    assert all(sorted(rep) == list("abcd") for rep in reps)
    follows = {(rep[k - 1], rep[k]) for rep in reps for k in range(1, 4)}
    assert follows == {(a, b) for a in "abcd" for b in "abcd" if a != b}
    assert run() == calls


def test_build_info_reports_the_build_commit():
    """setup.py writes mhr_ops/_build_meta.py at every build; build_info() reports its commit."""
    assert importlib.util.find_spec("mhr_ops._build_meta") is not None, "built without setup.py?"
    from mhr_ops import _build_meta

    commit = mhr_ops.build_info()["commit"]
    assert commit.removesuffix("-dirty") == _build_meta.COMMIT
    assert len(_build_meta.COMMIT) == 40 or _build_meta.COMMIT == "unknown (not built from a git checkout)"


def test_record_commit_comes_from_the_build_not_the_cwd(tmp_path, monkeypatch):
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("needs git")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "other repository"], check=True)
    info = dict(mhr_ops.build_info(), commit="feedface" * 5)
    monkeypatch.setattr(mhr_ops, "build_info", lambda: info)
    monkeypatch.chdir(tmp_path)
    rec = benchmarking.record(torch.device("cpu"), [], [fake_result()])
    assert rec["commit"] == "feedface" * 5 and rec["build"]["commit"] == rec["commit"]


def test_setup_py_stamps_the_commit(tmp_path):
    setup_py = runpy.run_path(str(ROOT / "setup.py"), run_name="not_main")  # builds nothing
    (tmp_path / "mhr_ops").mkdir()
    path = setup_py["write_build_meta"](str(tmp_path))  # not a git checkout
    meta = runpy.run_path(path)
    assert meta["COMMIT"] == "unknown (not built from a git checkout)" and meta["DIRTY"] is False
    commit, _ = setup_py["source_commit"](str(ROOT))
    if (ROOT / ".git").exists():
        assert len(commit) == 40


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_plot_writes_a_png(tmp_path):
    from mhr_ops.benchmarking.plot import plot

    roofline = Result("gpu", "adapter path (eval)", {}, "peft_layer_eval", {"mhr_ops_adapter": [50.0, 60.0]})
    roofline.samples_us["peft_layer_eval"] = [200.0, 210.0]
    roofline.ratio("mhr_ops_adapter", "peft_layer_eval")
    roofline.extra = {  # as the CUDA linear case records it
        "bytes": 3 << 28,
        "flops": 1 << 34,
        "roofline_impl": "mhr_ops_adapter",
        "ceilings": {"copy_GBps": 3000.0, "bf16_gemm_TFLOPs": 700.0},
    }
    rec = benchmarking.record(torch.device("cpu"), [], [fake_result(), roofline])
    plot(rec, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "GB/s" in benchmarking.format_shape_set(ShapeSet("gpu", "linear", "fake"), [roofline])


def test_moe_case_runs_at_a_tiny_size():
    """The moe case family end to end at a tiny size: four implementations side by side (they are
    checked to compute the same layer before timing), forward and forward + backward, ratios
    against the bare layer and our speedups over the two plain-PyTorch ways."""
    shape_set = ShapeSet("tiny-moe", "moe", "tiny", dict(N=24, d_in=16, d_out=12, E=4, k=2, r=2, dtype="float32"))
    results = benchmarking.CASES["moe"](torch.device("cpu"), shape_set)
    assert [r.case for r in results] == ["fwd", "fwd+bwd"]
    for r in results:
        assert set(r.samples_us) == {"bare", "mhr_ops", "gather_bmm", "dense_mask"}
        names = [m.name for m in r.metrics]
        assert "mhr_ops / bare" in names and "gather_bmm / mhr_ops" in names and "dense_mask / mhr_ops" in names
        assert all(s > 0 for s in r.samples_us["mhr_ops"])
    assert {"moe", "moe-small"} <= set(benchmarking.SHAPE_SETS)
    assert "mhr_ops / bare" in benchmarking.format_shape_set(shape_set, results)
