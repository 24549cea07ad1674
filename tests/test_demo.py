"""The README's demo runs and learns."""

import importlib.util
import pathlib

import pytest

DEMO = pathlib.Path(__file__).parents[1] / "examples" / "demo.py"


@pytest.mark.slow
def test_demo_trains_to_high_accuracy(capsys):
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    accuracy = demo.main()
    lines = capsys.readouterr().out.splitlines()
    losses = [float(line.split()[-1]) for line in lines if "train loss" in line]
    assert losses[-1] < losses[0] / 3
    assert accuracy >= 0.95
