"""Mixture-of-Recursions routing (Bae et al. 2025): each position's depth through a looped
core, chosen by a router at iteration starts (expert- or token-choice).

The router reads the state entering an iteration, after the loop's input re-injection, and
runs only on iteration starts. A position not routed through an iteration keeps its state;
a routed one's update is gated (``routing.gating``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from xlps.config import ModelSpec, RoutingSpec
from xlps.models import layers
from xlps.models.controllers import Context, Controller, loop, position_mean, sown_sum, when

Array = jax.Array


@struct.dataclass
class RouteState:
  """``valid`` (non-pad), ``active`` (ran the previous iteration), ``gate`` / ``gated`` (the
  update's scale and where it applies), ``start`` (the gated update's base), ``depth``
  (iterations run), ``routed`` ``[R, B, L]`` (who ran each iteration), ``aux`` (the
  weighted auxiliary loss so far) and, token-choice, ``assigned`` / ``choice_gate``."""

  valid: Array
  active: Array
  gate: Array
  gated: Array
  start: Array
  depth: Array
  routed: Array
  aux: Array
  assigned: Array | None = None
  choice_gate: Array | None = None


class Router(nn.Module):
  """The routers: ``outputs`` logits per position from one linear map per core iteration
  (``iterations > 1``; expert-choice: one score each) or one map for all."""

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


@dataclasses.dataclass(frozen=True)
class Routing(Controller):
  """Per-position recursion routing of a looped core (``spec.routing``). ``top_k``:
  expert-choice keeps the top ``capacity`` per sequence (training, or
  ``inference='top_k'``), else those whose router says > 0.5."""

  name = "routing"
  metrics = ("router_loss", "depth")
  top_k: bool = True

  @classmethod
  def make(cls, spec: ModelSpec, deterministic: bool, decoding: bool) -> "Routing | None":
    if spec.routing is None:
      return None
    top_k = not deterministic or spec.routing.inference == "top_k"
    if top_k and decoding and spec.routing.kind == "expert_choice":
      raise ValueError("expert-choice top-k routing ranks the whole sequence, which decoding "
                       "has not seen; decode with model.routing.inference='threshold'")
    return cls(spec, top_k)

  def start(self, x: Array, ctx: Context) -> RouteState:
    zeros = jnp.zeros(x.shape[:-1], jnp.float32)
    token_choice = self.spec.routing.kind == "token_choice"
    return RouteState(
        valid=jnp.ones(x.shape[:-1], bool) if ctx.valid is None else ctx.valid,
        active=zeros.astype(bool), gate=zeros, gated=zeros.astype(bool),
        start=jnp.zeros_like(x), depth=zeros,
        routed=jnp.zeros((self.spec.loop.max_iterations, *x.shape[:-1]), bool),
        aux=jnp.float32(0), assigned=zeros.astype(jnp.int32) if token_choice else None,
        choice_gate=zeros if token_choice else None)

  def enter(self, x: Array, step: Mapping[str, Array],
            states: Mapping) -> tuple[Array, RouteState]:
    """At an iteration start: the router's logits on the entering state, the decision, and
    the gated update's base (each iteration's input, except token-choice's residual gating,
    which builds on the recursion's input, iteration 0's)."""
    spec, most = self.spec.routing, self.spec.loop.max_iterations
    starts, iteration = step["starts"], step["iteration"]
    outputs = 1 if spec.kind == "expert_choice" else most
    router = Router(outputs, most if outputs == 1 else 1, name="router")
    logits = when(starts, router, lambda r: r(x, iteration),
                  lambda: jnp.zeros((*x.shape[:-1], outputs), jnp.float32))
    state = route(logits, states[self.name], iteration, starts, spec, self.top_k, most)
    first = starts & (iteration == 0)
    base = first if (spec.kind, spec.gating) == ("token_choice", "residual") else starts
    return x, state.replace(start=jnp.where(base[..., None], x, state.start))

  def leave(self, x: Array, x_before: Array, step: Mapping[str, Array],
            states: Mapping) -> tuple[Array, RouteState]:
    """Positions not routed through this iteration keep their state; at the iteration's end
    a routed position's update is gated: ``H + g f(H)`` (residual, the MoR code) or
    ``H + g (f(H) - H)`` (interpolate)."""
    state = states[self.name]
    running = loop.running(step, states[loop.Loop.name]) & (
        (step["iteration"] < 0) | state.active)
    x = jnp.where(running[..., None], x, x_before)
    start, new = state.start.astype(jnp.float32), x.astype(jnp.float32)
    gate = state.gate[..., None]
    if self.spec.routing.gating == "residual":
      gated = start + gate * new
    else:
      gated = start + gate * (new - start)
    ends = step["ends"] & running & state.gated
    return jnp.where(ends[..., None], gated.astype(x.dtype), x), state

  def finish(self, x: Array, state: RouteState, ctx: Context) -> tuple[Array, dict, dict]:
    return x, {"router": state.aux}, {"depth": state.depth, "routed": state.routed}

  def report(self, sown: Mapping, batch: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
    """The weighted auxiliary losses (a loss term) and the mean core iterations run."""
    aux = sown_sum(sown, "losses", "router")
    return aux, {"router_loss": aux, "depth": position_mean(sown, self.spec, "depth", batch)}


def route(logits: Array, state: RouteState, iteration: Array, starts: Array,
          spec: RoutingSpec, top_k: bool, num_iterations: int) -> RouteState:
  """A core iteration's routing decision for every position; only where ``starts`` (the
  first layer of an iteration) does anything change.

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
  valid = state.valid
  weight = valid.astype(jnp.float32)
  mean = lambda v: (v * weight).sum() / jnp.maximum(weight.sum(), 1.0)  # noqa: E731
  keep = lambda new, old: jnp.where(starts, new, old)  # noqa: E731
  aux = jnp.float32(0)
  if spec.kind == "expert_choice":
    z = logits[..., 0]
    gate = jax.nn.sigmoid(z)
    candidates = valid & ((iteration == 0) | state.active)
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
    assigned = jnp.where(first, choice + 1, state.assigned)
    choice_gate = jnp.where(first, jnp.max(probs, axis=-1), state.choice_gate)
    active = iteration < assigned
    gated = iteration == assigned - 1  # the last iteration's update is scaled
    gate = jnp.where(gated, choice_gate, 1.0)
    fraction = jax.vmap(mean, in_axes=-1)(jax.nn.one_hot(choice, num_iterations))
    balance = num_iterations * jnp.sum(fraction * jax.vmap(mean, in_axes=-1)(probs))
    z_loss = mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
    aux = jnp.where(first, spec.balance_weight * balance + spec.z_weight * z_loss, 0.0)
    # decided at iteration 0's first layer, then kept
    state = state.replace(assigned=keep(assigned, state.assigned),
                          choice_gate=keep(choice_gate, state.choice_gate))
  row = jnp.clip(iteration, 0, num_iterations - 1)
  return state.replace(
      active=keep(active, state.active), gate=keep(gate, state.gate),
      gated=keep(gated, state.gated),
      routed=state.routed.at[row].set(jnp.where(starts, active, state.routed[row])),
      depth=state.depth + (starts & active).astype(jnp.float32),
      aux=state.aux + jnp.where(starts, aux, 0.0))
