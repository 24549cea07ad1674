"""xent_jax: exact, fast cross-entropy losses for JAX.

Drop-in for ``optax.losses`` (same names, positional arguments and
per-example outputs), with PyTorch's options as keyword-only extras and
closed-form ``jax.custom_vjp`` gradients.
"""

from xent_jax._aux import Aux as Aux
from xent_jax._contrastive.api import clip_loss as clip_loss
from xent_jax._contrastive.api import siglip_loss as siglip_loss
from xent_jax._distillation.api import (
    linear_distillation_loss as linear_distillation_loss,
)
from xent_jax._extras import kl_divergence as kl_divergence
from xent_jax._extras import (
    kl_divergence_with_log_targets as kl_divergence_with_log_targets,
)
from xent_jax._extras import poly_loss_cross_entropy as poly_loss_cross_entropy
from xent_jax._extras import safe_softmax_cross_entropy as safe_softmax_cross_entropy
from xent_jax._extras import sigmoid_focal_loss as sigmoid_focal_loss
from xent_jax._extras import smooth_labels as smooth_labels
from xent_jax._extras import softmax_focal_loss as softmax_focal_loss
from xent_jax._linear.api import linear_cross_entropy as linear_cross_entropy
from xent_jax._sigmoid.api import (
    sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy,
)
from xent_jax._softmax.api import softmax_cross_entropy as softmax_cross_entropy
from xent_jax._softmax.api import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,  # noqa: E501
)

__version__ = "0.2.0"

__all__ = [
    "Aux",
    "clip_loss",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "poly_loss_cross_entropy",
    "safe_softmax_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "siglip_loss",
    "smooth_labels",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_focal_loss",
]
