"""The depth engine: ONE ``nn.scan`` over applied depth for every sharing pattern.

``Block`` is one applied layer. Its components (``attention``, ``mlp``, ``norms``,
``cross_attention``) hold parameters stacked over their own M unique slots (see
``layers.slot_param``); each scan step receives the applied-layer index and one slot
index per component and gathers those slots. The scan broadcasts the single parameter
tree (``variable_broadcast="params"``), so parameter memory, trace and compile time do
not grow with N; the backward pass accumulates each slot's gradient into its ``[M, ...]``
buffer. A new sharing pattern is a new slot table (``xlps.sharing``), not a new module.

``scan_layers=False`` runs the same ``Block`` instance in a Python loop: same parameter
tree, same results. It is the unrolled reference used by the tests.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xlps.config import ModelSpec
from xlps.models import layers
from xlps.sharing import Plan

Array = jax.Array
# Folded with the applied-layer index into the dropout key, so each dropout site of each
# applied layer draws an independent mask (also in the unrolled reference).
_DROPOUT_SITES = {"attention": 0, "attention_probs": 1, "cross_attention": 2,
                  "cross_attention_probs": 3, "mlp": 4}


class Norms(nn.Module):
  """The block's norms as one shareable component (ALBERT shares them with the layer)."""

  kind: str
  eps: float
  num_slots: int

  def setup(self):
    make = lambda: layers.Norm(self.kind, self.eps, self.num_slots)  # noqa: E731
    self.attention = make()
    self.cross_attention = make()
    self.mlp = make()

  def __call__(self, site: str, x: Array, slot: Array | None) -> Array:
    return getattr(self, site)(x, slot)


class Block(nn.Module):
  """One applied layer: self-attention, optional cross-attention, FFN; pre- or post-LN.

  ``slot_counts`` gives M for each parameter group. The block runs in encoder mode
  (``encoded is None``) or decoder mode (``encoded`` given: adds cross-attention). Masks
  (padding, causal, packing) come from the caller. With ``decoder_norms`` (tied encoder-decoder) decoder mode uses its
  own norms group while self-attention and FFN are the encoder's.
  """

  spec: ModelSpec
  slot_counts: tuple[tuple[str, int], ...]
  decoder_norms: bool = False

  @nn.compact
  def __call__(self, x: Array, step: Mapping[str, Array], mask: Array,
               encoded: Array | None, cross_mask: Array | None,
               dropout_key: Array | None) -> tuple[Array, None]:
    s = self.spec
    counts = dict(self.slot_counts)
    decoder_mode = encoded is not None
    norms_name = "decoder_norms" if decoder_mode and self.decoder_norms else "norms"

    def key(site):
      if dropout_key is None:
        return None
      return jax.random.fold_in(jax.random.fold_in(dropout_key, step["index"]),
                                _DROPOUT_SITES[site])

    def attention(name, count_key):
      return layers.Attention(s.num_heads, s.num_kv_heads, s.head_dim, counts[count_key],
                              s.use_bias, s.init_std, s.attention_dropout_rate, s.dtype,
                              name=name)

    norms = Norms(s.norm, s.norm_eps, counts[norms_name], name=norms_name)
    sublayers = [("attention", lambda h: attention("attention", "attention")(
        h, h, mask, step["attention"], key("attention_probs")))]
    if decoder_mode:
      sublayers.append(("cross_attention", lambda h: attention(
          "cross_attention", "cross_attention")(h, encoded, cross_mask, step["cross_attention"],
                                                key("cross_attention_probs"))))
    sublayers.append(("mlp", lambda h: layers.MLP(
        s.d_ff, s.activation, counts["mlp"], s.use_bias, s.init_std, s.dtype, name="mlp")(
            h, step["mlp"])))

    for site, fn in sublayers:
      if s.norm_position == "pre":
        x = x + layers.dropout(fn(norms(site, x, step["norms"])), s.dropout_rate, key(site))
      else:
        x = norms(site, x + layers.dropout(fn(x), s.dropout_rate, key(site)), step["norms"])
      x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, None


def slot_inputs(plans: Mapping[str, Plan]) -> dict[str, Array]:
  """Per-step scan inputs: the applied-layer index and each component's slot table."""
  n = next(iter(plans.values())).num_layers
  steps = {"index": jnp.arange(n, dtype=jnp.int32)}
  for comp, plan in plans.items():
    steps[comp] = jnp.asarray(np.asarray(plan.slots, np.int32))
  return steps


class Stack(nn.Module):
  """Applies ``Block`` over the applied depth given by ``plans`` (scan or unrolled)."""

  spec: ModelSpec
  slot_counts: tuple[tuple[str, int], ...]
  decoder_norms: bool = False

  @nn.compact
  def __call__(self, x: Array, plans: Mapping[str, Plan], mask: Array,
               encoded: Array | None = None, cross_mask: Array | None = None,
               deterministic: bool = True) -> Array:
    s = self.spec
    block_cls = Block
    if s.remat_policy != "none":
      policy = None if s.remat_policy == "full" else getattr(jax.checkpoint_policies,
                                                             s.remat_policy)
      block_cls = nn.remat(block_cls, policy=policy, prevent_cse=not s.scan_layers)
    if s.scan_layers:
      block_cls = nn.scan(block_cls, variable_broadcast="params",
                          split_rngs={"params": False},
                          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast))
    block = block_cls(spec=s, slot_counts=self.slot_counts, decoder_norms=self.decoder_norms,
                      name="layers")
    needs_rng = not deterministic and (s.dropout_rate > 0 or s.attention_dropout_rate > 0)
    dropout_key = self.make_rng("dropout") if needs_rng else None
    steps = slot_inputs(plans)
    if s.scan_layers:
      x, _ = block(x, steps, mask, encoded, cross_mask, dropout_key)
    else:
      for i in range(len(steps["index"])):
        x, _ = block(x, jax.tree.map(lambda a: a[i], steps), mask, encoded, cross_mask,
                     dropout_key)
    return x
