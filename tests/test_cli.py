"""The command line: help text for humans, argparse errors (exit status 2) instead of tracebacks."""

import subprocess
import sys

import pytest
import torch

from mhr_ops.__main__ import main
from mhr_ops.benchmarking import DEFAULT_SHAPES, SHAPE_SETS


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mhr_ops", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_is_plain_text():
    out = run_cli("--help")
    assert out.returncode == 0
    assert "``" not in out.stdout and ":func:" not in out.stdout  # no reST markup
    assert "demo" in out.stdout and "bench" in out.stdout


def test_bench_help_lists_shape_sets_and_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name, shape_set in SHAPE_SETS.items():
        assert name in out and shape_set.description.split()[0] in out
    for device, names in DEFAULT_SHAPES.items():
        assert f"{device}" in out and ",".join(names) in out


def test_demo_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    for option, words in (("--device", "cpu or cuda"), ("--steps", "training steps"), ("--seed", "seed")):
        assert option in out and words in out


def test_unknown_shape_set_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--shapes", "cpu-small,foo"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--shapes: unknown shape set(s) foo" in err and "cpu-small" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("command", ["bench", "demo"])
def test_cuda_without_cuda_is_an_argparse_error(command):
    out = run_cli(command, "--device", "cuda")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    if torch.version.cuda is None:
        assert f"--device cuda: this torch ({torch.__version__}) has no CUDA support" in out.stderr
    else:
        assert "--device cuda: " in out.stderr and "no CUDA device" in out.stderr


def test_bad_device_name_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "tpu"])
    assert e.value.code == 2 and "--device tpu" in capsys.readouterr().err
