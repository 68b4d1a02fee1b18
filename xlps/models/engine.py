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

from xlps import config as config_lib
from xlps.config import ModelSpec
from xlps.models import layers
from xlps.sharing import BLOCK_SCOPE, Plan, StackPlan

Array = jax.Array
# Folded with the applied-layer index into the dropout key, so each dropout site of each
# applied layer draws an independent mask (also in the unrolled reference).
_DROPOUT_SITES = {"attention": 0, "attention_probs": 1, "cross_attention": 2,
                  "cross_attention_probs": 3, "mlp": 4}


class Norms(nn.Module):
  """The block's norms as one shareable component (ALBERT shares them with the layer)."""

  kind: str
  eps: float
  num_unique: int

  def setup(self):
    make = lambda: layers.Norm(self.kind, self.eps, self.num_unique)  # noqa: E731
    self.attention = make()
    self.cross_attention = make()
    self.mlp = make()

  def __call__(self, site: str, x: Array, slot: Array | None) -> Array:
    return getattr(self, site)(x, slot)


class Block(nn.Module):
  """One applied layer: self-attention, optional cross-attention, FFN; pre- or post-LN.

  ``uses`` lists ``(component, group, num_unique)``: the block applies each component with
  the parameters of the submodule named ``group``, stacked over ``num_unique`` slots. The
  same module called with other uses (a tied decoder pass) shares the groups both name.
  Cross-attention runs when ``encoded`` is given; masks (padding, causal, packing) come
  from the caller.
  """

  spec: ModelSpec
  uses: tuple[tuple[str, str, int], ...]

  @nn.compact
  def __call__(self, x: Array, step: Mapping[str, Array], mask: Array,
               encoded: Array | None, cross_mask: Array | None,
               dropout_key: Array | None) -> tuple[Array, None]:
    s = self.spec
    groups = {comp: (group, m) for comp, group, m in self.uses}
    projected = lambda m: dict(num_unique=m, use_bias=s.use_bias,  # noqa: E731
                               init_std=s.init_std, dtype=s.dtype)

    def key(site):
      if dropout_key is None:
        return None
      return jax.random.fold_in(jax.random.fold_in(dropout_key, step["index"]),
                                _DROPOUT_SITES[site])

    def attention(comp):
      group, m = groups[comp]
      return layers.Attention(s.num_heads, s.num_kv_heads, s.head_dim, s.attention_dropout_rate,
                              s.attention_impl, name=group, **projected(m))

    norms = Norms(s.norm, s.norm_eps, groups["norms"][1], name=groups["norms"][0])
    sublayers = [("attention", lambda h: attention("attention")(
        h, h, mask, step["attention"], key("attention_probs")))]
    if "cross_attention" in groups:
      sublayers.append(("cross_attention", lambda h: attention("cross_attention")(
          h, encoded, cross_mask, step["cross_attention"], key("cross_attention_probs"))))
    sublayers.append(("mlp", lambda h: layers.MLP(
        s.d_ff, s.activation, name=groups["mlp"][0], **projected(groups["mlp"][1]))(
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
  """Owner of parameter groups; applies ``Block`` over a stack's applied depth.

  Called with a :class:`~xlps.sharing.StackPlan` whose ``owner`` is this module (scan or
  unrolled). Tied stacks are one ``Stack`` called with each stack's plan.

  With ``remat_group_size = k`` the depth is two scans: an outer one over N/k groups, each
  fully rematerialised (only its input is saved), and the inner one over the group's k
  layers. Backward then holds about N/k + k layer inputs instead of N (k ~ sqrt N: memory
  flat in depth up to a sqrt), at the price of one more forward pass. Both scans run the
  one ``Block`` (the same parameter tree as the one-level scan).
  """

  spec: ModelSpec

  @nn.compact
  def __call__(self, x: Array, plan: StackPlan, mask: Array,
               encoded: Array | None = None, cross_mask: Array | None = None,
               deterministic: bool = True) -> Array:
    s = self.spec
    uses = tuple((comp, group, p.num_unique) for comp, group, p in plan.uses)
    block = Block(spec=s, uses=uses, name=BLOCK_SCOPE)
    needs_rng = not deterministic and (s.dropout_rate > 0 or s.attention_dropout_rate > 0)
    dropout_key = self.make_rng("dropout") if needs_rng else None
    steps = slot_inputs(plan.plans)

    def layer(blk: Block, h: Array, step: Mapping[str, Array]) -> tuple[Array, None]:
      return blk(h, step, mask, encoded, cross_mask, dropout_key)

    if s.remat_policy != "none":
      policy = None if s.remat_policy == "full" else getattr(jax.checkpoint_policies,
                                                             s.remat_policy)
      layer = nn.remat(layer, policy=policy, prevent_cse=not s.scan_layers)
    if not s.scan_layers:
      for i in range(plan.num_layers):
        x, _ = layer(block, x, jax.tree.map(lambda a: a[i], steps))
      return x

    def scan(fn):
      return nn.scan(fn, variable_broadcast="params", split_rngs={"params": False})

    k = config_lib.remat_group_size(s.remat_group_size, plan.num_layers)
    if k:
      inner = scan(layer)
      layer = nn.remat(lambda blk, h, group: inner(blk, h, group), prevent_cse=False)
      steps = jax.tree.map(lambda a: a.reshape(plan.num_layers // k, k), steps)
    x, _ = scan(layer)(block, x, steps)
    return x
