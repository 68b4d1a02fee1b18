"""Per-position losses over the vocabulary (``train.loss``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def token_nll(logits: Array, targets: Array, loss: str = "softmax_cross_entropy") -> Array:
  """Negative log-likelihood of ``targets`` per position, in float32: under softmax, or
  under stablemax (Prieto et al. 2025, TRM's option for small puzzle data):
  ``s(x) = x + 1`` for ``x >= 0`` else ``1 / (1 - x)``, probabilities
  ``s(x_i) / sum_j s(x_j)`` (no exponentials, so no softmax collapse)."""
  logits = logits.astype(jnp.float32)
  if loss == "stablemax_cross_entropy":
    s = jnp.where(logits >= 0, logits + 1.0, 1.0 / (1.0 - jnp.minimum(logits, 0.0)))
    logp = jnp.log(s) - jnp.log(s.sum(-1, keepdims=True))
  else:
    logp = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
