"""Differential fuzzer: every public loss against the float64 reference.

Each test draws a case (``tests/fuzz_strategies.py``) for one public function:
the logits dtype (float16, bfloat16, float32; float64 under x64), the label
dtype (int8, int16, int32, uint8, uint16, uint32; int64 and uint64 under x64;
float soft labels), a shape bucket (an empty batch, a single class, a class
axis that is not last, tuple axes, more classes than 8-bit labels can hold), a
value regime (ordinary, |x| up to 1e30 within the dtype's range, a large common
offset) with per-row -inf (some, most or all classes, at the label), +inf and
NaN (at and away from the label, in a class ``where`` masks), NaN and inf in
unscored rows, labels in range, ignored and out of range (values that a
narrowing or wrapping conversion would turn into a class id or into
``ignore_index``), every keyword option with array arguments passed as NumPy
arrays, jnp arrays and Python lists (the language-model ones too: a
``temperature``, a causal ``shift``, ``segment_ids`` with padding and reused
ids and ``reduction="mean_per_segment"``, ``return_aux`` with every ``Aux``
field compared and ``lse`` and ``entropy`` differentiated, ``w_layout="vd"``),
``implementation=`` (the fused loss's Pallas kernels too, interpreted), and a
transformation: eager, ``jit``, ``vmap`` (jitted), ``grad`` with respect to
every differentiable argument, ``jit(grad)``, ``jit(grad(checkpoint))`` or, for
the language-model losses, ``jax.export`` with a symbolic sequence length
(``shift`` and ``segment_ids`` included). Issue 28's axes: temperatures at both
ends of what the compute dtype holds and just beyond them (a ``ValueError``
naming ``temperature``), ``return_aux``/``return_lse`` as ``bool``,
``np.bool_``, ``str`` or ``int`` (a ``TypeError`` for the last two), int64
segment ids beyond int32 with x64 off (a ``ValueError`` naming
``segment_ids``), a gradient-filter threshold that skips blocks while
``aux.entropy`` is differentiated (exact again), hard 0/1 labels differentiated
in every loss with float labels whose gradient is finite there, and a unit
cotangent, under which a 16-bit logits' gradient must be within half an ulp of
the float64 one (rounded once). Values and gradients are compared with the
reference evaluated in float64 on the same, exactly representable inputs: NaN
and inf positions exactly, finite values within a tolerance derived from the
dtype and the magnitude of the shifted logits; unscored rows must get exactly
zero gradient. Out-of-range labels must raise ``ValueError`` where the labels
are concrete (eager, ``grad``, Python lists) and give NaN where they are
traced.

Budget: CI runs the ``ci`` hypothesis profile (``tests/conftest.py``: fixed
seed, no deadline) with the per-test example counts below, about two minutes
of wall time under ``pytest -n auto`` on two cores, without shrinking (every
example compiles; a failing case is printed in full anyway: each input with
its dtype and form, the options, the transformation). The environment variable
``XENT_FUZZ_EXAMPLES`` sets ``max_examples`` of every test and switches to
random exploration with shrinking, for long campaigns (about 1-2 s per example
per core). A 20,000-example campaign (per test; add ``-k integer`` etc. to run
one function):

    XENT_FUZZ_EXAMPLES=20000 pytest -n auto -p no:cacheprovider tests/test_fuzz.py

A failure prints the case (``note``), the shrunk hypothesis draws and a
``@reproduce_failure`` blob: the material for a regression test in
``tests/test_regressions_bad_input.py``. ``XENT_FUZZ_LOG=path`` appends one
line per example that passed (its function), to count a campaign's examples.
"""

import os

import fuzz_paired as fp
import fuzz_strategies as fs
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

_CAMPAIGN = os.environ.get("XENT_FUZZ_EXAMPLES")
_LOG = os.environ.get("XENT_FUZZ_LOG")


def _passed(name):
    if _LOG:
        with open(_LOG, "a") as log:
            log.write(name + "\n")


def _settings(ci_examples):
    """CI: a fixed seed, no shrinking (each example compiles, so shrinking
    takes minutes; the failing case is printed in full anyway). A campaign:
    random exploration and shrinking, for a minimal case to turn into a
    regression test."""
    common = dict(
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        print_blob=True,
    )
    if _CAMPAIGN:
        return settings(max_examples=int(_CAMPAIGN), derandomize=False, **common)
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    return settings(max_examples=ci_examples, phases=phases, **common)


def _run(data, kind):
    case = fs.draw_case(data.draw, kind)
    note(case.describe())
    fs.check_case(case)
    _passed(kind)


@_settings(22)
@given(data=st.data())
@pytest.mark.slow
def test_fuzz_integer_labels(data):
    _run(data, "integer")


@_settings(17)
@given(data=st.data())
@pytest.mark.slow
def test_fuzz_soft_labels(data):
    _run(data, "soft")


@_settings(17)
@given(data=st.data())
@pytest.mark.slow
def test_fuzz_linear_cross_entropy(data):
    _run(data, "linear")


@_settings(18)
@given(data=st.data())
@pytest.mark.slow
def test_fuzz_sigmoid_binary_cross_entropy(data):
    _run(data, "bce")


@_settings(7)
@given(data=st.data())
@pytest.mark.slow
def test_fuzz_softmax_focal_loss(data):
    _run(data, "focal")


@pytest.mark.parametrize("name", fs.EXTRAS)
@_settings(3)
@given(data=st.data())
@pytest.mark.slow
def test_fuzz_extras(name, data):
    case = fs.draw_extras_case(data.draw, name)
    note(case.describe())
    fs.check_extras_case(case)
    _passed(name)


@pytest.mark.parametrize("kind", ["contrastive", "distillation"])
@_settings(10)
@given(data=st.data())
@pytest.mark.slow
def test_fuzz_paired_losses(kind, data):
    draw = {"contrastive": fp.draw_contrastive, "distillation": fp.draw_distillation}
    case = draw[kind](data.draw, st)
    note(case.describe())
    fp.check_paired_case(case)
    _passed(kind)
