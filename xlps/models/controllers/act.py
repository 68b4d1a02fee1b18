"""Adaptive Computation Time (Graves 2016; the Universal Transformer, Dehghani et al. 2018):
each position halts when its summed halting probability passes a threshold; the stack's
output is the halting-weighted sum (or interpolation) of its layer outputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from xlps.config import ModelSpec
from xlps.models import layers
from xlps.models.controllers import Context, Controller, sown_sum

Array = jax.Array


@struct.dataclass
class ActState:
  """Per position: ``halted``, ``halting`` (sum of p while running), ``remainders`` R,
  ``n_updates`` N, the ``output`` so far, the step's halting probability ``p`` (asked
  before the layer, used after it) and the token ``positions`` (for the coordinates)."""

  halted: Array
  halting: Array
  remainders: Array
  n_updates: Array
  output: Array
  p: Array
  positions: Array | None = None


def act_start(x: Array, positions: Array | None = None) -> ActState:
  """ACT's state before the first step: nothing halted, summed, or written yet."""
  zeros = jnp.zeros(x.shape[:-1], jnp.float32)
  return ActState(jnp.zeros(x.shape[:-1], bool), zeros, zeros, zeros, jnp.zeros_like(x), zeros,
                  positions)


def act_step(p: Array, state: ActState, transformed: Array, last: Array | bool,
             threshold: float, accumulate: bool = False) -> ActState:
  """One step of ACT for every position.

  ``p`` [B, L]: this step's halting probability. A running position halts when its summed
  probability would pass ``threshold`` (1 - eps) or at the ``last`` step; its weight w is p
  while it runs and its remainder ``R = 1 - halting`` when it halts, so its weights sum to
  1. With ``accumulate`` (the default) the output is Graves' ``output += transformed * w``
  (sum_t w_t transformed_t). That is what produced the Universal Transformer paper's
  numbers: tensor2tensor writes ``transformed * w + previous * 1 - w`` (no parentheses),
  i.e. ``sum_t w_t y_t - 1`` per position, and its final LayerNorm removes the constant.
  Otherwise Scenic's interpolation ``output = transformed * w + output * (1 - w)``, a
  different model. Halted positions are left exactly as they are.
  """
  running = ~state.halted
  total = state.halting + p
  halts = running & ((total > threshold) | last)
  continues = running & ~halts
  remainder = 1.0 - state.halting
  weight = jnp.where(continues, p, jnp.where(halts, remainder, 0.0))
  w = weight[..., None].astype(transformed.dtype)
  kept = state.output if accumulate else state.output * (1 - w)
  output = jnp.where(running[..., None], transformed * w + kept, state.output)
  return state.replace(halted=state.halted | halts,
                       halting=jnp.where(continues, total, state.halting),
                       remainders=jnp.where(halts, remainder, state.remainders),
                       n_updates=state.n_updates + running.astype(jnp.float32), output=output)


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


@dataclasses.dataclass(frozen=True)
class ACT(Controller):
  """ACT over the stack's applied layers (``spec.act``): N is the most steps a position
  takes. Before each layer it adds the coordinates (position and step sinusoids) and asks
  the halting unit; after it, folds the layer's output into the running output. The stack
  returns that output and sows each position's ponder cost ``N(t) + R(t)``
  (``intermediates/ponder``) and its mean over the non-pad positions (``losses/ponder``)."""

  name = "act"
  metrics = ("ponder",)

  @classmethod
  def make(cls, spec: ModelSpec, deterministic: bool, decoding: bool) -> "ACT | None":
    return None if spec.act is None else cls(spec)

  def start(self, x: Array, ctx: Context) -> ActState:
    return act_start(x, ctx.positions)

  def enter(self, x: Array, step: Mapping[str, Array],
            states: Mapping) -> tuple[Array, ActState]:
    state, a = states[self.name], self.spec.act
    if a.coordinates:
      x = x + (layers.sinusoid(state.positions, x.shape[-1])
               + layers.sinusoid(step["index"] + 1, x.shape[-1])).astype(x.dtype)
    return x, state.replace(p=HaltingUnit(a.halting_bias_init, name="halting")(x))

  def leave(self, x: Array, x_before: Array, step: Mapping[str, Array],
            states: Mapping) -> tuple[Array, ActState]:
    state, a = states[self.name], self.spec.act
    return x, act_step(state.p, state, x, step["last"], a.threshold,
                       a.update_rule == "accumulate")

  def finish(self, x: Array, state: ActState, ctx: Context) -> tuple[Array, dict, dict]:
    ponder = state.n_updates + state.remainders
    weight = jnp.ones_like(ponder) if ctx.valid is None else ctx.valid.astype(ponder.dtype)
    loss = (ponder * weight).sum() / jnp.maximum(weight.sum(), 1.0)
    return state.output, {"ponder": loss}, {"ponder": ponder}

  def report(self, sown: Mapping, batch: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
    """Graves' loss term ``ponder_weight x ponder``; ponder summed over stacks."""
    ponder = sown_sum(sown, "losses", "ponder")
    return self.spec.act.ponder_weight * ponder, {"ponder": ponder}
