"""Early exit of a looped core at inference (``loop.exit_threshold``; Huginn's adaptive
compute): at an iteration's end, a position whose state moved less than the threshold
(relative L2) since the previous iteration's end stops iterating and keeps its state."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import struct

from xlps.config import ModelSpec
from xlps.models.controllers import Context, Controller, loop, position_mean

Array = jax.Array


@struct.dataclass
class ExitState:
  """``exited`` per position, the ``previous`` iteration's end state, and ``depth``: the
  core iterations each position ran."""

  exited: Array
  previous: Array
  depth: Array


@dataclasses.dataclass(frozen=True)
class EarlyExit(Controller):
  """Per-position early exit (deterministic passes of a looped core with a threshold)."""

  name = "early_exit"
  metrics = ("depth",)

  @classmethod
  def make(cls, spec: ModelSpec, deterministic: bool, decoding: bool) -> "EarlyExit | None":
    on = spec.loop is not None and spec.loop.exit_threshold > 0 and deterministic
    return cls(spec) if on else None

  def start(self, x: Array, ctx: Context) -> ExitState:
    zeros = jnp.zeros(x.shape[:-1], jnp.float32)
    return ExitState(zeros.astype(bool), jnp.zeros_like(x), zeros)

  def leave(self, x: Array, x_before: Array, step: Mapping[str, Array],
            states: Mapping) -> tuple[Array, ExitState]:
    state, active = states[self.name], loop.running(step, states[loop.Loop.name])
    x = jnp.where((active & ~((step["iteration"] >= 0) & state.exited))[..., None], x, x_before)
    ends = step["ends"] & active
    change = jnp.linalg.norm((x - state.previous).astype(jnp.float32), axis=-1) / (
        jnp.linalg.norm(x.astype(jnp.float32), axis=-1) + 1e-9)
    exits = ends & (step["iteration"] > 0) & (change < self.spec.loop.exit_threshold)
    return x, ExitState(state.exited | exits, jnp.where(ends, x, state.previous),
                        state.depth + (ends & ~state.exited).astype(jnp.float32))

  def finish(self, x: Array, state: ExitState, ctx: Context) -> tuple[Array, dict, dict]:
    return x, {}, {"depth": state.depth}

  def report(self, sown: Mapping, batch: Mapping[str, Array]) -> tuple[None, dict[str, Array]]:
    """The mean core iterations run (no loss term: inference only)."""
    return None, {"depth": position_mean(sown, self.spec, "depth", batch)}
