"""Multi-device tests: 8 simulated CPU devices, in subprocesses.

JAX fixes its device count when it starts, and pytest (and its xdist workers)
already started it with one CPU device, so each case of
``tests/sharding_checks.py`` runs in a fresh interpreter with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. A case raises (and
the test fails with its traceback) when a value, a gradient or the compiled
HLO is wrong; it prints a JSON line with what it measured.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from tiers import slow

import xent_jax

SCRIPT = pathlib.Path(__file__).with_name("sharding_checks.py")
CASES = (
    "vocab_parallel",
    "megatron_smoothing",
    "padded_vocab",
    "data_parallel",
    "gspmd",
    "gspmd_explicit",
    "gspmd_linear",
    "gspmd_linear_explicit",
    "linear_vocab_parallel",
    "linear_bfloat16_split_dx",
    "label_range",
    "reduction_axis_checks",
    "segments_data_parallel",
    "collective_bytes",
    "skip_unscored",
    "contrastive_ring",
    "distillation_vocab_parallel",
    "vocabulary_groups",
)
TIMEOUT_S = 300  # each case takes seconds alone; margin for a busy `pytest -n auto`


def run_case(name: str) -> dict:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), name],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout
    report = json.loads(lines[0])
    assert report["case"] == name
    return report


def test_case_list_matches_the_script():
    defined = re.findall(r"^def case_(\w+)\(", SCRIPT.read_text(), re.MULTILINE)
    assert sorted(defined) == sorted(CASES)


# The fast tier keeps one cheap case that runs axis_name and reduction_axis_name.
FAST_CASES = ("label_range",)


@pytest.mark.parametrize(
    "name", [name if name in FAST_CASES else slow(name) for name in CASES]
)
def test_sharding_case(name):
    if name.startswith("gspmd_linear") and not hasattr(
        xent_jax, "linear_cross_entropy"
    ):
        pytest.skip("xent_jax.linear_cross_entropy is not available")
    report = run_case(name)
    assert "skipped" not in report, report
