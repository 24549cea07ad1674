"""What ``return_aux=True`` returns beside the loss."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from xent_jax._stats import KernelOut


class Aux(NamedTuple):
    """Per-example statistics computed in the pass that computes the loss.

    Every field has the per-example losses' shape. ``lse`` and ``entropy`` are
    differentiable (on scored examples; elsewhere they carry no gradient),
    ``argmax`` is an integer, ``correct`` and ``scored`` are booleans.
    """

    lse: jax.Array
    """Log-sum-exp of the (tempered, capped) logits over the kept classes; 0
    on a row without a finite kept logit (where it is ``-inf``)."""
    argmax: jax.Array
    """Predicted class (global id), the first on ties as ``jnp.argmax``."""
    correct: jax.Array
    """``argmax == label`` on scored examples, False elsewhere."""
    entropy: jax.Array
    """Entropy of the softmax, in nats."""
    scored: jax.Array
    """Whether the example is scored (not ignored, out of range, masked, segment
    padding or past the ``shift``): the other fields hold values computed from
    its logits there too, so average them over ``scored`` (accuracy is
    ``correct.sum() / scored.sum()``, not ``correct.mean()``)."""


def make_aux(out: KernelOut, scored, target, batch_shape) -> Aux:
    """``Aux`` from a kernel's per-example outputs; ``target`` is the class
    ``argmax`` is compared with (the label, or the soft target's mode)."""
    correct = scored & (out.argmax == target)
    fields = (out.lse, out.argmax, correct, out.entropy, scored)
    return Aux(*(jnp.reshape(f, batch_shape) for f in fields))
