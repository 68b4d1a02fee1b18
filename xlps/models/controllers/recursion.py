"""Latent recursion with deep supervision (TRM, Jolicoeur-Martineau 2025; HRM, Wang et al.
2025): the recursion in the scan, and the train / eval steps that supervise it.

**In the scan** (``Recursion``). The stack applies one small net (``net_layers`` layers)
``cycles x (latent_steps + 1)`` times. Each cycle updates the latent ``z <- net(z + y + x)``
``latent_steps`` times, then the answer ``y <- net(y + z)``; ``x`` is the input embedding,
re-injected at every latent update. The controller keeps ``x``, ``y`` and ``z`` in its
state and, at the first layer of each application, sets the scan's stream to that
application's input; at the last layer it stores the result as the new ``z`` or ``y``.
``gradient='last_cycle'`` (TRM) trains the last cycle only; ``'one_step'`` (HRM) the last
``z`` and ``y`` updates only. The layers before run as a scan of their own whose output is
detached (``no_grad_layers``): their gradient is exactly zero and their backward pass is
never built. ``separate_nets`` gives the ``y`` updates their own parameters (HRM's H net;
the slot table, ``RecursionSpec.sharing``). The stack's output is ``y``; ``(y, z)`` is
the carry it returns for the next supervision step.

**Deep supervision** (``train_step``). Each example runs up to ``supervision_steps``
forward passes, each continuing from the previous pass's detached carry, each with its
own loss and its own optimizer update (TRM's Figure 3 / HRM's training loop). A halting
head on ``y`` ends an example's steps early: ``halting='bce'`` (TRM) trains
``q_halt`` with BCE against "the answer is exactly right" and halts at ``q_halt > 0``;
``'q_learning'`` (HRM) also trains ``q_continue`` towards
``sigmoid(max(q_halt', q_continue'))`` of the next step (one extra forward pass, no
gradient; at the last step ``q_halt'``) and halts at ``q_halt > q_continue``. A share
``halt_exploration`` of the examples gets a random minimum of 2..N_sup steps. The loop
ends when every example has halted, so training spends no compute on halted examples.

Where TRM's and HRM's code differ from this: their code keeps the carry *across* train
batches (an example halted in one batch is replaced by a new example in its row), so one
batch of their loader is one supervision step of a mix of examples. Here one batch runs
all its supervision steps in one ``train_step`` (a ``lax.while_loop``, compiled once:
compile time does not grow with N_sup): the per-example schedule of updates is the
same, the batch composition is not. ``train.num_steps`` counts batches; the optimizer
(and its schedule: ``warmup_steps`` / ``decay_steps``) counts updates, up to
``supervision_steps`` per batch. Examples are averaged over those still running (TRM
divides by the full batch, all of whose rows run in its design).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from xlps.config import ModelSpec
from xlps.models.controllers import Context, Controller
from xlps.models.losses import token_nll

Array = jax.Array


@struct.dataclass
class RecursionState:
  """``e``: the input embedding; ``y``: the answer stream; ``z``: the latent."""

  e: Array
  y: Array
  z: Array


def initial_carry(shape: tuple[int, ...], dtype: Any) -> tuple[Array, Array]:
  """(y, z) of a fresh example of ``shape`` (batch, length, d_model): fixed draws of
  N(0, 1) cut at +-2 (TRM's H_init / L_init buffers), the same for every position and
  example; not trained."""
  y0, z0 = (jax.random.truncated_normal(jax.random.PRNGKey(k), -2.0, 2.0, shape[-1:])
            for k in (1, 2))
  return jnp.broadcast_to(y0, shape).astype(dtype), jnp.broadcast_to(z0, shape).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Recursion(Controller):
  """Latent recursion (``spec.recursion``); see the module docstring."""

  name = "recursion"
  metrics = ("supervision_steps", "halt_accuracy")

  @classmethod
  def make(cls, spec: ModelSpec, deterministic: bool, decoding: bool) -> "Recursion | None":
    return None if spec.recursion is None or decoding else cls(spec)

  def start(self, x: Array, ctx: Context) -> RecursionState:
    y, z = ctx.carried.get(self.name) or initial_carry(x.shape, x.dtype)
    return RecursionState(x, y, z)

  def _role(self, step: Mapping[str, Array]) -> tuple[Array, Array, Array]:
    """(first layer of an application, last layer of one, the application updates z)."""
    r = self.spec.recursion
    index = step["index"]
    application = index // r.net_layers
    updates_z = application % (r.latent_steps + 1) < r.latent_steps
    return (index % r.net_layers == 0, index % r.net_layers == r.net_layers - 1, updates_z)

  def enter(self, x: Array, step: Mapping[str, Array],
            states: Mapping[str, RecursionState]) -> tuple[Array, RecursionState]:
    state = states[self.name]
    first, _, updates_z = self._role(step)
    source = jnp.where(updates_z, state.z + state.y + state.e, state.y + state.z)
    return jnp.where(first, source, x), state

  def leave(self, x: Array, x_before: Array, step: Mapping[str, Array],
            states: Mapping[str, RecursionState]) -> tuple[Array, RecursionState]:
    state = states[self.name]
    _, last, updates_z = self._role(step)
    return x, state.replace(z=jnp.where(last & updates_z, x, state.z),
                            y=jnp.where(last & ~updates_z, x, state.y))

  def finish(self, x: Array, state: RecursionState, ctx: Context) -> tuple[Array, dict, dict]:
    return state.y, {}, {}

  def carried(self, state: RecursionState) -> tuple[Array, Array]:
    return state.y, state.z

  def no_grad_layers(self) -> int:
    return self.spec.recursion.no_grad_layers

  def detach(self, state: RecursionState) -> RecursionState:
    return state.replace(y=jax.lax.stop_gradient(state.y), z=jax.lax.stop_gradient(state.z))


def halts(q: Array, halting: str) -> Array:
  """Whether the halting head says stop: TRM ``q_halt > 0``, HRM ``q_halt > q_continue``."""
  if halting == "bce":
    return q[:, 0] > 0
  if halting == "q_learning":
    return q[:, 0] > q[:, 1]
  return jnp.zeros(q.shape[:1], bool)


def halting_loss(q: Array, exact: Array, next_q: Array | None, last: Array | bool,
                 halting: str) -> Array:
  """Per example: BCE(q_halt, exact); with ``q_learning`` plus BCE(q_continue, target)
  where target = sigmoid(q_halt') at the last step, else sigmoid(max(q_halt',
  q_continue')) of the next step (``next_q``, no gradient)."""
  if halting == "none":
    return jnp.zeros(q.shape[:1], jnp.float32)
  loss = optax.sigmoid_binary_cross_entropy(q[:, 0], exact.astype(jnp.float32))
  if halting == "q_learning":
    target = jax.nn.sigmoid(jnp.where(last, next_q[:, 0], next_q.max(-1)))
    loss = loss + optax.sigmoid_binary_cross_entropy(q[:, 1], jax.lax.stop_gradient(target))
  return loss


def _cells(logits: Array, batch: Mapping[str, Array]) -> tuple[Array, Array, Array]:
  """Per example: weighted cells, correctly predicted weighted cells, exactly solved."""
  weights = batch["weights"].astype(jnp.float32)
  right = (logits.argmax(-1) == batch["targets"]).astype(jnp.float32) * weights
  cells = weights.sum(-1)
  exact = jnp.all((right > 0) | (weights == 0), axis=-1) & (cells > 0)
  return cells, right.sum(-1), exact


def train_step(state: Any, batch: Mapping[str, Array], *, model: nn.Module,
               optimizer: optax.GradientTransformation, skip_nonfinite: bool = False,
               loss: str = "softmax_cross_entropy") -> tuple[Any, dict[str, Array]]:
  """One batch of deep supervision: up to ``supervision_steps`` optimizer updates (see the
  module docstring). Metric sums as ``xlps.train.train_step``'s, over every (example,
  supervision step) that ran (``useful_tokens``: the batch's cells, once);
  ``supervision_steps``: the mean steps an example ran."""
  r = model.spec.recursion
  rows = batch["inputs"].shape[0]
  key = jax.random.fold_in(state.rng, state.step)
  explore_key, min_key, dropout_key = jax.random.split(key, 3)
  explore = jax.random.uniform(explore_key, (rows,)) < r.halt_exploration
  min_steps = jnp.where(explore, jax.random.randint(min_key, (rows,), 2,
                                                    r.supervision_steps + 1), 0)
  weights = batch["weights"].astype(jnp.float32)
  nonpad = (batch["inputs"] != 0).sum(-1).astype(jnp.float32)

  def loss_fn(params, carried, active, s, step_key):
    apply = lambda c: model.apply({"params": params}, batch, deterministic=False,  # noqa: E731
                                  carried=c, rngs={"dropout": step_key})
    logits, q, new = apply(carried)
    nll = token_nll(logits, batch["targets"], loss) * weights
    cells, right, exact = _cells(logits, batch)
    last = s + 1 >= r.supervision_steps
    next_q = None
    if r.halting == "q_learning":  # HRM's bootstrapped target: the next step's Q-values
      next_q = jax.lax.stop_gradient(apply(jax.lax.stop_gradient(new))[1])
    per_example = (nll.sum(-1) / jnp.maximum(cells, 1.0)
                   + r.halt_loss_weight * halting_loss(q, exact, next_q, last, r.halting))
    on = active.astype(jnp.float32)
    total = (per_example * on).sum() / jnp.maximum(on.sum(), 1.0)
    stats = {"loss_sum": (nll.sum(-1) * on).sum(), "tokens": (cells * on).sum(),
             "correct": (right * on).sum(), "seq_correct": (exact * on).sum(),
             "sequences": ((cells > 0) * on).sum(),
             "halt_accuracy": ((halts(q, "bce" if r.halting == "none" else r.halting)
                                == exact) * on).sum()}
    return total, (stats, jax.lax.stop_gradient(new), jax.lax.stop_gradient(q))

  def body(c):
    s, params, opt_state, carried, active, sums, steps_run = c
    (value, (stats, new, q)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, carried, active, s, jax.random.fold_in(dropout_key, s))
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      keep = lambda new_, old: jnp.where(finite, new_, old)  # noqa: E731
      new_params = jax.tree.map(keep, new_params, params)
      new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
      stats = jax.tree.map(lambda m: jnp.where(finite, m, 0.0), stats)
    stats = {**stats, "grad_norm": grad_norm, "nonfinite": 1.0 - finite.astype(jnp.float32)}
    done = s + 1
    halted = (done >= r.supervision_steps) | (halts(q, r.halting) & (done >= min_steps))
    sums = jax.tree.map(jnp.add, sums, stats)
    return (done, new_params, new_opt_state, new, active & ~halted, sums,
            steps_run + active.astype(jnp.float32))

  zeros = {k: jnp.zeros((), jnp.float32) for k in (
      "loss_sum", "tokens", "correct", "seq_correct", "sequences", "halt_accuracy",
      "grad_norm", "nonfinite")}
  has_cells = weights.sum(-1) > 0
  fresh = {Recursion.name: initial_carry((*batch["inputs"].shape, model.spec.d_model),
                                         model.spec.dtype)}
  start = (jnp.int32(0), state.params, state.opt_state, fresh, has_cells, zeros,
           jnp.zeros((rows,), jnp.float32))
  s, params, opt_state, _, active, sums, steps_run = jax.lax.while_loop(
      lambda c: (c[0] < r.supervision_steps) & c[4].any(), body, start)
  metrics = dict(sums)
  metrics["grad_norm"] = sums["grad_norm"] / jnp.maximum(s, 1)
  metrics["nonfinite"] = jnp.minimum(sums["nonfinite"], 1.0)
  metrics["halt_accuracy"] = sums["halt_accuracy"] / jnp.maximum(sums["sequences"], 1.0)
  metrics["supervision_steps"] = steps_run.sum() / jnp.maximum(has_cells.sum(), 1)
  # Throughput counts the batch's cells once per train step (its FLOPs: every step's).
  metrics["useful_tokens"] = nonpad.sum()
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Mapping[str, Array], iterations: Array | None = None, *,
              model: nn.Module, loss: str = "softmax_cross_entropy") -> dict[str, Array]:
  """Metric sums of one batch after ``eval_supervision_steps`` supervision steps (a scan:
  compiled once). With ``eval_halting`` (and a halting head) each example answers at the
  step its head halts (else at the last); ``supervision_steps`` is the mean step it
  answered at, ``halt_accuracy`` how often the head's halt / go-on matched the answer
  being exact. ``exact_by_step`` / ``cells_by_step`` [S]: exactly solved examples and
  right cells after each step s = 1..S, without halting (accuracy against test-time
  steps). The loss is ``train.loss``'s."""
  if iterations is not None:
    raise ValueError("a puzzle model evaluates model.recursion.eval_supervision_steps "
                     "supervision steps; train.eval_iterations is for looped models")
  r = model.spec.recursion
  halting = r.halting if r.eval_halting else "none"
  rows = batch["inputs"].shape[0]

  def body(c, _):
    carried, answer, answered_at, halted, agree, s = c
    logits, q, new = model.apply({"params": params}, batch, deterministic=True,
                                 carried=carried)
    cells, right, exact = _cells(logits, batch)
    stop = halts(q, halting) | (s + 1 >= r.eval_supervision_steps)
    answer = jnp.where(halted[:, None, None], answer, logits)
    answered_at = jnp.where(halted, answered_at, s + 1)
    agree = agree + ((halts(q, "bce" if r.halting == "none" else r.halting) == exact)
                     & (cells > 0)).sum()
    return (new, answer, answered_at, halted | stop, agree, s + 1), (exact.sum(), right.sum())

  d = model.spec.d_model
  logits_shape = (*batch["inputs"].shape, model.spec.vocab_size)
  start = ({Recursion.name: initial_carry((*batch["inputs"].shape, d), model.spec.dtype)},
           jnp.zeros(logits_shape, jnp.float32), jnp.zeros((rows,), jnp.int32),
           jnp.zeros((rows,), bool), jnp.zeros((), jnp.float32), jnp.int32(0))
  (_, answer, answered_at, _, agree, _), (exact_by_step, cells_by_step) = jax.lax.scan(
      body, start, None, length=r.eval_supervision_steps)
  weights = batch["weights"].astype(jnp.float32)
  nll = token_nll(answer, batch["targets"], loss) * weights
  cells, right, exact = _cells(answer, batch)
  counted = (cells > 0).astype(jnp.float32)
  sequences = counted.sum()
  return {"loss_sum": nll.sum(), "tokens": cells.sum(), "correct": right.sum(),
          "seq_correct": exact.sum().astype(jnp.float32), "sequences": sequences,
          "supervision_steps": (answered_at * counted).sum() / jnp.maximum(sequences, 1.0),
          "halt_accuracy": agree / jnp.maximum(sequences * r.eval_supervision_steps, 1.0),
          "exact_by_step": exact_by_step.astype(jnp.float32),
          "cells_by_step": cells_by_step, "batches": jnp.ones((), jnp.float32)}
