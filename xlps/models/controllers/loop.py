"""The looped prelude / core / coda (Huginn; Geiping et al. 2025): one core block iterated.

The first core layer saves the prelude output ``e`` and starts the core from the initial
state; each iteration's first layer may cut the gradient (only the last
``backprop_iterations`` iterations train) and re-injects ``e``; layers of iterations past
the depth asked for (sampled in training) leave the state as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import struct

from xlps.config import LoopSpec, ModelSpec
from xlps.models import layers
from xlps.models.controllers import Context, Controller, when

Array = jax.Array


@struct.dataclass
class LoopState:
  """``e``: the prelude output (saved at the first core layer); ``init``: the core's
  initial state (None: the prelude output itself); ``iterations``: core iterations to run."""

  e: Array
  init: Array | None
  iterations: Array


def running(step: Mapping[str, Array], state: LoopState) -> Array:
  """Whether this layer runs: outside the core, or in one of the first ``iterations``."""
  return (step["iteration"] < 0) | (step["iteration"] < state.iterations)


@dataclasses.dataclass(frozen=True)
class Loop(Controller):
  """The looped core (``spec.loop``)."""

  name = "loop"

  @classmethod
  def make(cls, spec: ModelSpec, deterministic: bool, decoding: bool) -> "Loop | None":
    return None if spec.loop is None else cls(spec)

  def start(self, x: Array, ctx: Context) -> LoopState:
    """Core iterations to run (given, sampled in training, else ``eval_iterations``) and the
    initial core state. ``init_state=random`` draws N(0, init_std) per position: in training
    from the step's dropout key; in deterministic passes from a key folded with each
    token's absolute position only, so a token starts from the same state whatever its
    batch row, chunk or chunk length, and cached decoding equals recomputation."""
    lp = self.spec.loop
    key = None if ctx.deterministic else ctx.rng()
    iterations = ctx.iterations
    if iterations is None:
      iterations = lp.eval_iterations
      if key is not None:
        iterations = sample_iterations(jax.random.fold_in(key, 1), lp)
    init = None
    if lp.init_state == "zeros":
      init = jnp.zeros_like(x)
    elif lp.init_state == "random":
      if key is None:
        draw = lambda p: jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), p),  # noqa: E731
                                           x.shape[-1:])
        init = jax.vmap(draw)(ctx.positions.reshape(-1)).reshape(x.shape)
      else:
        init = jax.random.normal(jax.random.fold_in(key, 2), x.shape)
      init = (init * self.spec.init_std).astype(x.dtype)
    return LoopState(jnp.zeros_like(x), init, jnp.asarray(iterations, jnp.int32))

  def enter(self, x: Array, step: Mapping[str, Array],
            states: Mapping[str, LoopState]) -> tuple[Array, LoopState]:
    """A core iteration's start: save e and start the state (first iteration), cut the
    gradient before the last ``backprop_iterations`` iterations (Huginn detaches the first
    max(r - k, 0)), re-inject e."""
    lp, state = self.spec.loop, states[self.name]
    starts, iteration = step["starts"], step["iteration"]
    first = starts & (iteration == 0)
    state = state.replace(e=jnp.where(first, x, state.e))
    if state.init is not None:
      x = jnp.where(first, state.init, x)
    if lp.backprop_iterations:
      cut = starts & (iteration > 0) & (iteration == state.iterations - lp.backprop_iterations)
      x = jnp.where(cut, jax.lax.stop_gradient(x), x)
    if lp.inject == "add":
      x = jnp.where(starts, x + state.e, x)
    elif lp.inject == "adapter":
      s = self.spec
      adapter = layers.Dense((x.shape[-1],), (None,), ("embed",), use_bias=s.use_bias,
                             init_std=s.init_std, dtype=s.dtype, name="adapter")
      x = when(starts, adapter,
               lambda a: a(jnp.concatenate([x, state.e], -1)).astype(x.dtype), lambda: x)
    return x, state

  def leave(self, x: Array, x_before: Array, step: Mapping[str, Array],
            states: Mapping[str, LoopState]) -> tuple[Array, LoopState]:
    state = states[self.name]
    return jnp.where(running(step, state), x, x_before), state

  def finish(self, x: Array, state: LoopState, ctx: Context) -> tuple[Array, dict, dict]:
    return x, {}, {"iterations": state.iterations}


def sample_iterations(key: Array, loop: LoopSpec) -> Array:
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
