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


def act_step(p: Array, state: Mapping[str, Array], transformed: Array, last: Array | bool,
             threshold: float, accumulate: bool = False) -> dict[str, Array]:
  """One step of Adaptive Computation Time for every position (Graves 2016, Dehghani 2018).

  ``p`` [B, L]: this step's halting probability; ``state``: ``halted`` (bool),
  ``halting`` (sum of p while running), ``remainders`` R, ``n_updates`` N and ``output``.
  A running position halts when its summed probability would pass ``threshold`` (1 - eps)
  or at the ``last`` step; its weight w is p while it runs and its remainder
  ``R = 1 - halting`` when it halts, so its weights sum to 1. With ``accumulate`` (the
  default) the output is Graves' ``output += transformed * w`` (sum_t w_t transformed_t).
  That is what produced the Universal Transformer paper's numbers: tensor2tensor writes
  ``transformed * w + previous * 1 - w`` (no parentheses), i.e. ``sum_t w_t y_t - 1`` per
  position, and its final LayerNorm removes the constant. Otherwise Scenic's interpolation
  ``output = transformed * w + output * (1 - w)``, a different model. Halted positions are
  left exactly as they are.
  """
  running = ~state["halted"]
  total = state["halting"] + p
  halts = running & ((total > threshold) | last)
  continues = running & ~halts
  remainder = 1.0 - state["halting"]
  weight = jnp.where(continues, p, jnp.where(halts, remainder, 0.0))
  w = weight[..., None].astype(transformed.dtype)
  kept = state["output"] if accumulate else state["output"] * (1 - w)
  output = jnp.where(running[..., None], transformed * w + kept, state["output"])
  return {"halted": state["halted"] | halts,
          "halting": jnp.where(continues, total, state["halting"]),
          "remainders": jnp.where(halts, remainder, state["remainders"]),
          "n_updates": state["n_updates"] + running.astype(jnp.float32),
          "output": output}


def act_start(x: Array) -> dict[str, Array]:
  """ACT's state before the first step: nothing halted, summed, or written yet."""
  zeros = jnp.zeros(x.shape[:-1], jnp.float32)
  return {"halted": jnp.zeros(x.shape[:-1], bool), "halting": zeros, "remainders": zeros,
          "n_updates": zeros, "output": jnp.zeros_like(x)}


class HaltingUnit(nn.Module):
  """ACT's halting probability ``sigmoid(x . w + b)`` per position, one unit for all steps."""

  bias_init: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("embed",)), (x.shape[-1],))
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.constant(self.bias_init), ()), ())
    return jax.nn.sigmoid(x.astype(jnp.float32) @ kernel + bias)


class Router(nn.Module):
  """Mixture-of-Recursions' routers: ``outputs`` logits per position from one linear map per
  core iteration (``iterations > 1``; expert-choice: one score each) or one map for all."""

  outputs: int
  iterations: int

  @nn.compact
  def __call__(self, x: Array, iteration: Array) -> Array:
    lead = (self.iterations,) if self.iterations > 1 else ()
    axes = ("unique",) * len(lead)
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (*axes, "embed", None)), (*lead, x.shape[-1], self.outputs))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (*axes, None)),
                      (*lead, self.outputs))
    if lead:
      slot = jnp.clip(iteration, 0, self.iterations - 1)
      kernel, bias = layers.take_slot(kernel, slot), layers.take_slot(bias, slot)
    return x.astype(jnp.float32) @ kernel + bias


def route(logits: Array, state: Mapping[str, Array], iteration: Array, starts: Array,
          spec: config_lib.RoutingSpec, top_k: bool, num_iterations: int) -> dict[str, Array]:
  """A core iteration's routing decision for every position (Mixture-of-Recursions).

  ``state``: ``valid`` (non-pad), ``active`` (ran the previous iteration), ``routed``
  ``[R, B, L]`` (who ran each iteration), ``depth`` (iterations run), ``aux`` (the weighted
  auxiliary loss so far), ``gate`` / ``gated`` (the update's scale and where it applies)
  and, token-choice, ``assigned`` / ``choice_gate``. Only where ``starts`` (the first layer
  of an iteration) does anything change. The router reads the state entering the
  iteration, after input re-injection.

  * expert_choice: score ``s = sigmoid(logits[..., 0])``; among the positions that ran the
    previous iteration, the ``capacity[r] x L`` best scores per sequence run iteration r
    (``top_k``; training), or those with ``s > 0.5`` (all of them at capacity 1): the causal
    inference path that the auxiliary BCE(s, top-k selection) trains the router for. With
    ``gating='residual'`` (the MoR code) a routed position's state becomes ``H + g f(H)``,
    ``g = alpha s``; with ``interpolate``, ``H + s (f(H) - H)``.
  * token_choice: at iteration 0, ``p = softmax(logits)`` over the R depths; each position
    runs ``d = argmax + 1`` iterations; ``residual`` (the MoR code): its output is
    ``x + p_d f^d(x)``, x the state entering iteration 0 (earlier iterations ungated);
    ``interpolate``: the last iteration is ``H + p_d (f(H) - H)``. Auxiliary Switch load
    balance ``R sum_j f_j P_j`` and router z-loss.
  """
  valid = state["valid"]
  weight = valid.astype(jnp.float32)
  mean = lambda v: (v * weight).sum() / jnp.maximum(weight.sum(), 1.0)  # noqa: E731
  out = dict(state)
  aux = jnp.float32(0)
  if spec.kind == "expert_choice":
    z = logits[..., 0]
    gate = jax.nn.sigmoid(z)
    candidates = valid & ((iteration == 0) | state["active"])
    if top_k:
      capacity = np.maximum(1, np.round(np.asarray(spec.capacity) * valid.shape[-1]))
      k = jnp.asarray(capacity.astype(np.int32))[jnp.clip(iteration, 0, num_iterations - 1)]
      score = jnp.where(candidates, gate, -1.0)
      rank = jnp.argsort(jnp.argsort(-score, axis=-1, stable=True), axis=-1, stable=True)
      active = candidates & (rank < k)
      label = active.astype(jnp.float32)
      bce = -(label * jax.nn.log_sigmoid(z) + (1 - label) * jax.nn.log_sigmoid(-z))
      cand = candidates.astype(jnp.float32)
      aux = spec.aux_weight * (bce * cand).sum() / jnp.maximum(cand.sum(), 1.0)
    else:  # iterations at full capacity keep every candidate, as in training
      full = jnp.asarray(np.asarray(spec.capacity) >= 1)[jnp.clip(iteration, 0, num_iterations - 1)]
      active = candidates & ((gate > 0.5) | full)
    gated = active
    if spec.gating == "residual":
      gate = spec.alpha * gate
  else:
    first = iteration == 0
    probs = jax.nn.softmax(logits, axis=-1)
    choice = jnp.argmax(logits, axis=-1)
    assigned = jnp.where(first, choice + 1, state["assigned"])
    choice_gate = jnp.where(first, jnp.max(probs, axis=-1), state["choice_gate"])
    active = iteration < assigned
    gated = iteration == assigned - 1  # the last iteration's update is scaled
    gate = jnp.where(gated, choice_gate, 1.0)
    fraction = jax.vmap(mean, in_axes=-1)(jax.nn.one_hot(choice, num_iterations))
    balance = num_iterations * jnp.sum(fraction * jax.vmap(mean, in_axes=-1)(probs))
    z_loss = mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
    aux = jnp.where(first, spec.balance_weight * balance + spec.z_weight * z_loss, 0.0)
  row = jnp.clip(iteration, 0, num_iterations - 1)
  routed = state["routed"].at[row].set(jnp.where(starts, active, state["routed"][row]))
  keep = lambda new, old: jnp.where(starts, new, old)  # noqa: E731
  out.update(active=keep(active, state["active"]), gate=keep(gate, state["gate"]),
             gated=keep(gated, state["gated"]),
             routed=routed, depth=state["depth"] + (starts & active).astype(jnp.float32),
             aux=state["aux"] + jnp.where(starts, aux, 0.0))
  if spec.kind == "token_choice":  # decided at iteration 0's first layer, then kept
    out.update(assigned=keep(assigned, state["assigned"]),
               choice_gate=keep(choice_gate, state["choice_gate"]))
  return out


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
  when ``encoded`` is given, else read). With ACT (``spec.act``), ``act`` is its state
  (``act_step``): the block adds the coordinates (``positions`` and step sinusoids), asks
  its halting unit, applies the layer and folds the result into ``act["output"]``.
  In a looped stack (``spec.loop``), ``loop`` holds the prelude output ``e``, the initial
  core state ``init`` and the ``iterations`` to run: the first core layer saves ``e`` and
  starts from ``init``; each iteration's first layer may cut the gradient (the last
  ``backprop_iterations`` iterations train) and re-injects ``e``; layers of iterations past
  ``iterations`` leave the state as it is, and so do those of positions that exited early
  (inference with ``exit_threshold``; ``loop`` then also tracks ``exited``, the
  ``previous`` iteration's state and each position's ``depth``). Returns
  ``(x, kv, act, loop)``.
  """

  spec: ModelSpec
  uses: tuple[tuple[str, str, int], ...]
  depth: int = 0                     # N applied layers (the stack LoRA adapters are over)
  top_k_routing: bool = True         # expert-choice: top-k per sequence (else router > 0.5)

  @nn.compact
  def __call__(self, x: Array, step: Mapping[str, Array], mask: Array,
               encoded: Array | None, cross_mask: Array | None,
               dropout_key: Array | None,
               kv: Mapping[str, Array] | None = None,
               act: Mapping[str, Array] | None = None,
               loop: Mapping[str, Array] | None = None,
               positions: Array | None = None) -> tuple:
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

    if loop is not None:
      x_before = x
      x, loop = self._enter_iteration(x, step, loop)
    if act is not None:
      if s.act.coordinates:
        x = x + (layers.sinusoid(positions, x.shape[-1])
                 + layers.sinusoid(step["index"] + 1, x.shape[-1])).astype(x.dtype)
      p = HaltingUnit(s.act.halting_bias_init, name="halting")(x)
    for site, fn in sublayers:
      if s.norm_position == "pre":
        x = x + layers.dropout(fn(norms(site, x, step["norms"])), s.dropout_rate, key(site))
      else:
        x = norms(site, x + layers.dropout(fn(x), s.dropout_rate, key(site)), step["norms"])
      x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    if act is not None:
      act = act_step(p, act, x, step["last"], s.act.threshold, s.act.update_rule == "accumulate")
    if loop is not None:
      x, loop = self._leave_layer(x, x_before, step, loop)
    return x, kv, act, loop

  def _leave_layer(self, x: Array, x_before: Array, step: Mapping[str, Array],
                   loop: Mapping[str, Array]) -> tuple[Array, dict]:
    """Keeps the state of iterations past ``iterations`` (and of exited positions) as it was;
    at an iteration's end, early exit: a position whose state moved less than
    ``exit_threshold`` (relative L2) since the previous iteration's end stops iterating."""
    iteration = step["iteration"]
    in_core = iteration >= 0
    active = ~in_core | (iteration < loop["iterations"])
    if "routed" in loop:  # positions not routed through this iteration keep their state
      running = active & (~in_core | loop["active"])
      x = jnp.where(running[..., None], x, x_before)
      start, new = loop["start"].astype(jnp.float32), x.astype(jnp.float32)
      gate = loop["gate"][..., None]
      if self.spec.routing.gating == "residual":  # MoR: H + g f(H)
        gated = start + gate * new
      else:  # interpolate: H + g (f(H) - H)
        gated = start + gate * (new - start)
      ends = step["ends"] & running & loop["gated"]
      return jnp.where(ends[..., None], gated.astype(x.dtype), x), loop
    if "exited" not in loop:
      return jnp.where(active, x, x_before), loop
    running = active & ~(in_core & loop["exited"])
    x = jnp.where(running[..., None], x, x_before)
    ends = step["ends"] & active
    change = jnp.linalg.norm((x - loop["previous"]).astype(jnp.float32), axis=-1) / (
        jnp.linalg.norm(x.astype(jnp.float32), axis=-1) + 1e-9)
    exits = ends & (iteration > 0) & (change < self.spec.loop.exit_threshold)
    loop = {**loop, "exited": loop["exited"] | exits,
            "previous": jnp.where(ends, x, loop["previous"]),
            "depth": loop["depth"] + (ends & ~loop["exited"]).astype(jnp.float32)}
    return x, loop

  def _enter_iteration(self, x: Array, step: Mapping[str, Array],
                       loop: Mapping[str, Array]) -> tuple[Array, dict]:
    """A core iteration's start: save e / start the state (first iteration), cut the
    gradient before the last ``backprop_iterations`` iterations, re-inject e."""
    lp = self.spec.loop
    starts, iteration = step["starts"], step["iteration"]
    first = starts & (iteration == 0)
    loop = {**loop, "e": jnp.where(first, x, loop["e"])}
    if loop["init"] is not None:  # else the core starts from the prelude output itself
      x = jnp.where(first, loop["init"], x)
    if lp.backprop_iterations:  # Huginn: the first max(r - k, 0) iterations run without grad
      cut = starts & (iteration > 0) & (iteration == loop["iterations"] - lp.backprop_iterations)
      x = jnp.where(cut, jax.lax.stop_gradient(x), x)
    if lp.inject == "add":
      x = jnp.where(starts, x + loop["e"], x)
    elif lp.inject == "adapter":
      adapter = layers.Dense((x.shape[-1],), (None,), ("embed",), use_bias=self.spec.use_bias,
                             init_std=self.spec.init_std, dtype=self.spec.dtype, name="adapter")
      x = jnp.where(starts, adapter(jnp.concatenate([x, loop["e"]], -1)).astype(x.dtype), x)
    routing = self.spec.routing
    if routing is not None:  # routes on the state entering the recursion (after injection)
      outputs = 1 if routing.kind == "expert_choice" else lp.max_iterations
      logits = Router(outputs, lp.max_iterations if outputs == 1 else 1, name="router")(
          x, iteration)
      loop = route(logits, loop, iteration, starts, routing, self.top_k_routing,
                   lp.max_iterations)
      # The gated update's base: each iteration's input, except token-choice's reference
      # gating, which builds on the recursion's input (iteration 0's).
      base = first if (routing.kind, routing.gating) == ("token_choice", "residual") else starts
      loop["start"] = jnp.where(base[..., None], x, loop["start"])
    return x, loop


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

  With ACT (``spec.act``) N is the most steps a position takes: the carry also holds the
  halting state, the stack returns the halting-weighted output and sows each position's
  ponder cost ``N(t) + R(t)`` as ``intermediates/ponder`` and its mean over the ``valid``
  (non-pad) positions as ``losses/ponder``.
  """

  spec: ModelSpec

  @nn.compact
  def __call__(self, x: Array, plan: StackPlan, mask: Array,
               encoded: Array | None = None, cross_mask: Array | None = None,
               deterministic: bool = True,
               cache: Mapping[str, Array] | None = None,
               positions: Array | None = None,
               iterations: Array | int | None = None,
               valid: Array | None = None) -> Array | tuple[Array, dict]:
    s = self.spec
    uses = tuple((comp, group, p.num_unique) for comp, group, p in plan.uses)
    top_k = s.routing is not None and (not deterministic or s.routing.inference == "top_k")
    if top_k and cache is not None and s.routing.kind == "expert_choice":
      raise ValueError("expert-choice top-k routing ranks the whole sequence, which decoding "
                       "has not seen; decode with model.routing.inference='threshold'")
    block = Block(spec=s, uses=uses, depth=plan.num_layers, top_k_routing=top_k,
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
    act = None
    if s.act is not None:
      act = act_start(x)

    loop = None
    if s.loop is not None:
      loop = self._loop_state(x, deterministic, iterations, valid, positions)

    def layer(blk: Block, carry: tuple, step: Mapping[str, Array]) -> tuple[tuple, None]:
      return blk(carry[0], step, mask, encoded, cross_mask, dropout_key, *carry[1:],
                 positions=positions), None

    if s.remat_policy != "none":
      policy = None if s.remat_policy == "full" else getattr(jax.checkpoint_policies,
                                                             s.remat_policy)
      layer = nn.remat(layer, policy=policy, prevent_cse=not s.scan_layers)
    carry = (x, kv, act, loop)
    if not s.scan_layers:
      for i in range(plan.num_layers):
        carry, _ = layer(block, carry, jax.tree.map(lambda a: a[i], steps))
    else:
      def scan(fn):
        return nn.scan(fn, variable_broadcast="params", split_rngs={"params": False})

      k = config_lib.remat_group_size(s.remat_group_size, plan.num_layers)
      if k:
        inner = scan(layer)
        layer = nn.remat(lambda blk, c, group: inner(blk, c, group), prevent_cse=False)
        steps = jax.tree.map(lambda a: a.reshape(plan.num_layers // k, k), steps)
      carry, _ = scan(layer)(block, carry, steps)
    x, kv, act, loop = carry
    if loop is not None:
      self.sow("intermediates", "iterations", loop["iterations"])
      if "depth" in loop:  # early exit or routing: core iterations each position ran
        self.sow("intermediates", "depth", loop["depth"])
      if "routed" in loop:
        self.sow("intermediates", "routed", loop["routed"])
        self.sow("losses", "router", loop["aux"])
    if act is not None:
      x = act["output"]
      ponder = act["n_updates"] + act["remainders"]
      self.sow("intermediates", "ponder", ponder)
      weight = jnp.ones_like(ponder) if valid is None else valid.astype(ponder.dtype)
      self.sow("losses", "ponder", (ponder * weight).sum() / jnp.maximum(weight.sum(), 1.0))
    return x if cache is None else (x, kv)

  def _loop_state(self, x: Array, deterministic: bool, iterations: Array | int | None,
                  valid: Array | None, positions: Array) -> dict[str, Array]:
    """Core iterations to run (given, sampled in training, else ``eval_iterations``), the
    initial core state, a slot for the prelude output and, with routing, ``route``'s state.

    ``init_state=random`` draws N(0, init_std) per position: in training from the step's
    dropout key; in deterministic passes from a key folded with each token's absolute
    position only (``positions``), so a token starts from the same state whatever its
    batch row, chunk or chunk length, and cached decoding equals recomputation."""
    lp = self.spec.loop
    key = None if deterministic else self.make_rng("dropout")
    if iterations is None:
      iterations = lp.eval_iterations
      if key is not None:
        iterations = sample_iterations(jax.random.fold_in(key, 1), lp)
    iterations = jnp.asarray(iterations, jnp.int32)
    init = None  # "prelude": the core starts from the prelude output itself
    if lp.init_state == "zeros":
      init = jnp.zeros_like(x)
    elif lp.init_state == "random":
      if key is None:
        draw = lambda p: jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), p),  # noqa: E731
                                           x.shape[-1:])
        init = jax.vmap(draw)(positions.reshape(-1)).reshape(x.shape)
      else:
        init = jax.random.normal(jax.random.fold_in(key, 2), x.shape)
      init = (init * self.spec.init_std).astype(x.dtype)
    state = {"e": jnp.zeros_like(x), "init": init, "iterations": iterations}
    zeros = jnp.zeros(x.shape[:-1], jnp.float32)
    if lp.exit_threshold and deterministic:
      state.update(exited=zeros.astype(bool), previous=jnp.zeros_like(x), depth=zeros)
    if self.spec.routing is not None:
      state.update(valid=jnp.ones(x.shape[:-1], bool) if valid is None else valid,
                   active=zeros.astype(bool), gate=zeros, gated=zeros.astype(bool),
                   start=jnp.zeros_like(x), depth=zeros,
                   routed=jnp.zeros((lp.max_iterations, *x.shape[:-1]), bool),
                   aux=jnp.float32(0))
      if self.spec.routing.kind == "token_choice":
        state.update(assigned=zeros.astype(jnp.int32), choice_gate=zeros)
    return state


def sample_iterations(key: Array, loop: config_lib.LoopSpec) -> Array:
  """Core iterations for one train step (one draw for the whole batch), in
  [1, loop.max_iterations]: ``fixed`` = mean; ``uniform`` over 1..2 mean - 1; Huginn's
  ``poisson_lognormal``: ``Poisson(exp(tau)) + 1`` with ``tau ~ N(log(mean) - 1/8, 1/2)``,
  whose mean before clipping is ``mean + 1`` (as Huginn samples it)."""
  mean, most = loop.mean_iterations, loop.max_iterations
  if loop.train_iterations == "fixed":
    return jnp.int32(mean)
  if loop.train_iterations == "uniform":
    draw = jax.random.randint(key, (), 1, 2 * mean)
  else:
    normal_key, poisson_key = jax.random.split(key)
    sigma = 0.5
    tau = jnp.log(mean) - sigma ** 2 / 2 + sigma * jax.random.normal(normal_key)
    draw = jax.random.poisson(poisson_key, jnp.exp(tau)) + 1
  return jnp.clip(draw, 1, most).astype(jnp.int32)
