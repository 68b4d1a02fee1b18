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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xlps import config as config_lib
from xlps.config import ModelSpec
from xlps.models import controllers as controllers_lib
from xlps.models import layers
from xlps.sharing import BLOCK_SCOPE, StackPlan

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
  Cross-attention runs when ``encoded`` is given (or its K/V are cached); masks (padding,
  causal, packing) come from the caller.

  ``kv`` is the K/V carried along depth, or None: ``k`` / ``v`` (self-attention, entry
  ``step["kv_entry"]``, written at ``index`` where ``step["kv_write"]``) and, decoding an
  encoder-decoder, ``cross_k`` / ``cross_v`` (entry = the cross-attention slot: written
  when ``encoded`` is given, else read). ``controllers`` (``xlps.models.controllers``)
  enter before the layer and leave after it, each with its entry of ``states``; their
  parameters live in this block's scope. Returns ``(x, kv, states)``.
  """

  spec: ModelSpec
  uses: tuple[tuple[str, str, int], ...]
  depth: int = 0                     # N applied layers (the stack LoRA adapters are over)
  controllers: tuple[controllers_lib.Controller, ...] = ()

  @nn.compact
  def __call__(self, x: Array, step: Mapping[str, Array], mask: Array,
               encoded: Array | None, cross_mask: Array | None,
               dropout_key: Array | None,
               kv: Mapping[str, Array] | None = None,
               states: Mapping[str, Any] | None = None) -> tuple:
    s = self.spec
    groups = {comp: (group, m) for comp, group, m in self.uses}
    projected = lambda m: dict(num_unique=m, use_bias=s.use_bias,  # noqa: E731
                               init_std=s.init_std, dtype=s.dtype, lora=s.lora,
                               depth=self.depth)
    kv = None if kv is None else dict(kv)

    def key(site):
      if dropout_key is None:
        return None
      return jax.random.fold_in(jax.random.fold_in(dropout_key, step["index"]),
                                _DROPOUT_SITES[site])

    def attention(comp, h, source, attn_mask, prefix, cache):
      group, m = groups[comp]
      module = layers.Attention(s.num_heads, s.num_kv_heads, s.head_dim,
                                s.attention_dropout_rate, s.attention_impl, name=group,
                                **projected(m))
      args = (h, source, attn_mask, step[comp], key(f"{comp}_probs"))
      if cache is None:
        return module(*args, layer=step["index"])
      out, cache = module(*args, cache=cache, layer=step["index"])
      kv[f"{prefix}k"], kv[f"{prefix}v"] = cache.k, cache.v
      return out

    def self_attention(h):
      cache = None
      if kv is not None and "k" in kv:
        cache = layers.KVSlot(kv["k"], kv["v"], step["kv_entry"], step.get("kv_write", True),
                              kv["index"])
      return attention("attention", h, h, mask, "", cache)

    def cross_attention(h):
      cache = None
      if kv is not None and "cross_k" in kv:
        cache = layers.KVSlot(kv["cross_k"], kv["cross_v"], step["cross_attention"],
                              encoded is not None, 0)
      return attention("cross_attention", h, encoded, cross_mask, "cross_", cache)

    norms = Norms(s.norm, s.norm_eps, groups["norms"][1], name=groups["norms"][0])
    sublayers = [("attention", self_attention)]
    if "cross_attention" in groups:
      sublayers.append(("cross_attention", cross_attention))
    sublayers.append(("mlp", lambda h: layers.MLP(
        s.d_ff, s.activation, name=groups["mlp"][0], **projected(groups["mlp"][1]))(
            h, step["mlp"], step["index"])))

    states, x_before = dict(states or {}), x
    for c in self.controllers:
      x, states[c.name] = c.enter(x, step, states)
    for site, fn in sublayers:
      if s.norm_position == "pre":
        x = x + layers.dropout(fn(norms(site, x, step["norms"])), s.dropout_rate, key(site))
      else:
        x = norms(site, x + layers.dropout(fn(x), s.dropout_rate, key(site)), step["norms"])
      x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    for c in reversed(self.controllers):
      x, states[c.name] = c.leave(x, x_before, step, states)
    return x, kv, states


def slot_inputs(plan: StackPlan, decoding: bool = False,
                loop: config_lib.LoopSpec | None = None) -> dict[str, Array]:
  """Per-step scan inputs: the applied-layer index, each component's slot table and, where
  K/V are shared, the entry each layer reads (decode cache entry, or training buffer row)
  and whether it writes it; for a looped stack each layer's core iteration (-1 outside the
  core) and whether it starts one."""
  n = plan.num_layers
  steps = {"index": jnp.arange(n, dtype=jnp.int32), "last": jnp.arange(n) == n - 1}
  if loop is not None:
    core = np.arange(n) - loop.prelude
    in_core = (core >= 0) & (core < loop.core * loop.max_iterations)
    steps["iteration"] = jnp.asarray(np.where(in_core, core // loop.core, -1), jnp.int32)
    steps["starts"] = jnp.asarray(in_core & (core % loop.core == 0))
    steps["ends"] = jnp.asarray(in_core & (core % loop.core == loop.core - 1))
  for comp, p in plan.plans.items():
    steps[comp] = jnp.asarray(np.asarray(p.slots, np.int32))
  kv = plan.kv
  if decoding:
    steps["kv_entry"] = jnp.asarray(np.asarray(kv.entries if kv else range(plan.num_layers),
                                               np.int32))
  elif kv is not None and kv.shared:
    steps["kv_entry"] = jnp.asarray(np.asarray(kv.registers, np.int32))
  if kv is not None and kv.shared:
    steps["kv_write"] = jnp.asarray(np.asarray(kv.produces, bool))
  return steps


def cache_shapes(spec: ModelSpec, plan: StackPlan, batch_size: int, length: int,
                 source_length: int = 0) -> dict[str, tuple[int, ...]]:
  """Shapes of one stack's decode cache: self-attention K/V entries over ``length`` positions
  and, with ``source_length``, cross-attention K/V per cross-attention slot."""
  c = plan.kv.num_entries if plan.kv else plan.num_layers
  shapes = {"k": (batch_size, c, length, spec.num_kv_heads, spec.head_dim)}
  shapes["v"] = shapes["k"]
  if source_length:
    m = plan.plans["cross_attention"].num_unique
    shapes["cross_k"] = shapes["cross_v"] = (batch_size, m, source_length, spec.num_kv_heads,
                                             spec.head_dim)
  return shapes


class Stack(nn.Module):
  """Owner of parameter groups; applies ``Block`` over a stack's applied depth.

  Called with a :class:`~xlps.sharing.StackPlan` whose ``owner`` is this module (scan or
  unrolled). Tied stacks are one ``Stack`` called with each stack's plan.

  With ``remat_group_size = k`` the depth is two scans: an outer one over N/k groups, each
  fully rematerialised (only its input is saved), and the inner one over the group's k
  layers. Backward then holds about N/k + k layer inputs instead of N (k ~ sqrt N: memory
  flat in depth up to a sqrt), at the price of one more forward pass. Both scans run the
  one ``Block`` (the same parameter tree as the one-level scan).

  K/V shared across layers (``plan.kv``) travel in the scan's carry: in training a buffer of
  ``kv.num_registers`` rows; decoding, the stack's ``cache`` (``cache_shapes`` plus the
  write position ``index``), and the call returns ``(x, cache)``.

  Depth methods (ACT, a looped core, routing, early exit) are the controllers the spec
  enables (``xlps.models.controllers``): their states travel in the carry too, and after
  the scan each gives the stack's output and sows its losses and intermediates.
  ``iterations`` (a looped core's depth), ``valid`` (non-pad positions) and ``positions``
  are theirs to read. A controller may keep state across calls (latent recursion's (y, z)
  between supervision steps): with ``carried`` given ({} for a fresh start) the call
  returns ``(x, carried)``, each such controller's ``carried(state)`` by name. Leading
  layers that a controller says train no gradient (``no_grad_layers``) run as a scan of
  their own, and the carry is detached after it.
  """

  spec: ModelSpec

  @nn.compact
  def __call__(self, x: Array, plan: StackPlan, mask: Array,
               encoded: Array | None = None, cross_mask: Array | None = None,
               deterministic: bool = True,
               cache: Mapping[str, Array] | None = None,
               positions: Array | None = None,
               iterations: Array | int | None = None,
               valid: Array | None = None,
               carried: Mapping[str, Any] | None = None) -> Array | tuple[Array, dict]:
    s = self.spec
    uses = tuple((comp, group, p.num_unique) for comp, group, p in plan.uses)
    controllers = controllers_lib.active(s, deterministic, decoding=cache is not None)
    block = Block(spec=s, uses=uses, depth=plan.num_layers, controllers=controllers,
                  name=BLOCK_SCOPE)
    needs_rng = not deterministic and (s.dropout_rate > 0 or s.attention_dropout_rate > 0)
    dropout_key = self.make_rng("dropout") if needs_rng else None
    steps = slot_inputs(plan, decoding=cache is not None, loop=s.loop)
    kv = cache
    if cache is None and plan.kv is not None and plan.kv.shared:
      shape = (x.shape[0], plan.kv.num_registers, x.shape[1], s.num_kv_heads, s.head_dim)
      buffer = jnp.zeros(shape, s.dtype)
      kv = {"k": buffer, "v": buffer, "index": jnp.int32(0)}
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    ctx = controllers_lib.Context(deterministic, lambda: self.make_rng("dropout"), iterations,
                                  valid, positions, carried or {})
    states = {c.name: c.start(x, ctx) for c in controllers}

    def layer(blk: Block, carry: tuple, step: Mapping[str, Array]) -> tuple[tuple, None]:
      return blk(carry[0], step, mask, encoded, cross_mask, dropout_key, *carry[1:]), None

    if s.remat_policy != "none":
      policy = None if s.remat_policy == "full" else getattr(jax.checkpoint_policies,
                                                             s.remat_policy)
      layer = nn.remat(layer, policy=policy, prevent_cse=not s.scan_layers)
    # Leading layers that train no gradient run apart, and the carry is detached after them.
    prefix = max((c.no_grad_layers() for c in controllers), default=0)

    def detach(carry: tuple) -> tuple:
      x, kv, states = carry
      return (jax.lax.stop_gradient(x), jax.tree.map(jax.lax.stop_gradient, kv),
              {c.name: c.detach(states[c.name]) for c in controllers})

    carry = (x, kv, states)
    if not s.scan_layers:
      for i in range(plan.num_layers):
        carry = detach(carry) if i == prefix > 0 else carry
        carry, _ = layer(block, carry, jax.tree.map(lambda a: a[i], steps))
    else:
      def scan(fn):
        return nn.scan(fn, variable_broadcast="params", split_rngs={"params": False})

      k = config_lib.remat_group_size(s.remat_group_size, plan.num_layers)
      if k:
        inner = scan(layer)
        layer = nn.remat(lambda blk, c, group: inner(blk, c, group), prevent_cse=False)
        steps = jax.tree.map(lambda a: a.reshape(plan.num_layers // k, k), steps)
      if prefix:
        carry, _ = scan(layer)(block, carry, jax.tree.map(lambda a: a[:prefix], steps))
        carry = detach(carry)
        steps = jax.tree.map(lambda a: a[prefix:], steps)
      carry, _ = scan(layer)(block, carry, steps)
    x, kv, states = carry
    for c in controllers:
      x, losses, intermediates = c.finish(x, states[c.name], ctx)
      for name, value in intermediates.items():
        self.sow("intermediates", name, value)
      for name, value in losses.items():
        self.sow("losses", name, value)
    if carried is not None:
      return x, {c.name: c.carried(states[c.name]) for c in controllers
                 if c.carried(states[c.name]) is not None}
    return x if cache is None else (x, kv)
