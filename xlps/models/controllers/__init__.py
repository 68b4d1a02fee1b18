"""Depth controllers: each depth method is one module that steers the scan over applied depth.

``engine.Block`` applies one layer; a controller decides what happens around it. A stack
runs the controllers its spec enables (``active``), in ``CONTROLLERS`` order, inside the
one ``nn.scan``:

==========================================  ==============================================
``start(x, ctx) -> state``                  before the scan; ``state`` is a
                                            ``flax.struct`` dataclass the scan carries
``enter(x, step, states) -> (x, state)``    before each applied layer, in order; may
                                            create parameters (they live in the block)
``leave(x, x_before, step, states)``        after the layer, in reverse order;
``-> (x, state)``                           ``x_before`` is the state entering the block
``finish(x, state, ctx)``                   after the scan: the stack's output, the losses
``-> (x, losses, intermediates)``           and intermediates it sows
``report(sown, batch) -> (term, metrics)``  after the model: its term of the training loss
                                            (or None) and its ``metrics`` (batch means)
==========================================  ==============================================

Two optional parts, for methods with a state that outlives one stack call (latent
recursion's (y, z) between supervision steps): ``carried(state)`` gives what the stack
returns to its caller (who passes it back in as ``Context.carried`` next call), and
``no_grad_layers()`` a static count of leading layers that train no gradient: the stack
runs them as a scan of their own and detaches the carry after them (``detach``), so their
backward pass is never built.

``states`` maps each running controller's ``name`` to its state; a controller changes only
its own and may read others' (routing and early exit read the loop's depth). ``step`` holds
the scan inputs of the layer (``engine.slot_inputs``: ``index``, ``iteration``, ``starts``,
``ends``, ...). The trainer adds every term to the loss and logs every metric
(``xlps.train.apply_model``). Adding a depth method: a module here with a ``Controller``
subclass, one line in ``CONTROLLERS``, and its section in ``xlps.config.depth``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from xlps.config import ModelSpec

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Context:
  """What a stack call tells its controllers: the mode, a key source (``rng()`` draws the
  stack's next dropout key; training only), the core iterations asked for, the non-pad
  positions, the token positions and what the caller carried in from the previous call
  (controller name -> its ``carried``; empty for a fresh start)."""

  deterministic: bool
  rng: Callable[[], Array]
  iterations: Array | int | None
  valid: Array | None
  positions: Array
  carried: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Controller:
  """A depth method (see the module docstring). Instances are static (hashable): the spec
  plus whatever the call fixes (e.g. routing's top-k rule); traced values live in state."""

  name: ClassVar[str]
  metrics: ClassVar[tuple[str, ...]] = ()   # what ``report`` gives (logged as train_/eval_)
  spec: ModelSpec

  @classmethod
  def make(cls, spec: ModelSpec, deterministic: bool, decoding: bool) -> "Controller | None":
    """The controller a stack call runs, or None where ``spec`` (and the mode) leave it off."""
    raise NotImplementedError

  def start(self, x: Array, ctx: Context) -> Any:
    raise NotImplementedError

  def enter(self, x: Array, step: Mapping[str, Array],
            states: Mapping[str, Any]) -> tuple[Array, Any]:
    return x, states[self.name]

  def leave(self, x: Array, x_before: Array, step: Mapping[str, Array],
            states: Mapping[str, Any]) -> tuple[Array, Any]:
    return x, states[self.name]

  def finish(self, x: Array, state: Any,
             ctx: Context) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    return x, {}, {}

  def report(self, sown: Mapping[str, Any],
             batch: Mapping[str, Array]) -> tuple[Array | None, dict[str, Array]]:
    return None, {}

  def carried(self, state: Any) -> Any:
    """What outlives the stack call (returned to the caller), or None."""
    return None

  def no_grad_layers(self) -> int:
    """Leading applied layers that train no gradient (static)."""
    return 0

  def detach(self, state: Any) -> Any:
    """``state`` after the no-grad layers: what must not carry their gradient cut."""
    return state


def sown_sum(sown: Mapping[str, Any], collection: str, name: str) -> Array:
  """The sum over stacks (in name order) of what they sowed as ``collection/name``."""
  return sum(jax.tree.leaves({stack: values[name] for stack, values in sown[collection].items()
                              if name in values}))


def position_mean(sown: Mapping[str, Any], spec: ModelSpec, name: str,
                  batch: Mapping[str, Array]) -> Array:
  """The mean of the first stack's per-position intermediate ``name`` over the scored
  positions (the batch's ``weights``; all positions without them)."""
  value = jax.tree.leaves(sown["intermediates"][spec.stacks[0].name][name])[0]
  weight = batch["weights"] if "weights" in batch else jnp.ones_like(value)
  return (value * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def when(pred: Array, module: nn.Module, call: Callable[[nn.Module], Array],
         otherwise: Callable[[], Array]) -> Array:
  """``call(module)`` where the traced scalar ``pred`` holds, else ``otherwise()``, as a
  ``lax.cond``: layers where it does not hold skip the module's matmuls (forward and
  backward). Initialisation calls the module unconditionally, so its parameters exist."""
  if module.is_initializing():
    return jnp.where(pred, call(module), otherwise())
  variables, pure = module.variables, module.clone(parent=None)
  return jax.lax.cond(pred, lambda v: call(pure.bind(v)), lambda v: otherwise(), variables)


def active(spec: ModelSpec, deterministic: bool, decoding: bool) -> tuple[Controller, ...]:
  """The controllers a stack call of ``spec`` runs, in application order."""
  made = (cls.make(spec, deterministic, decoding) for cls in CONTROLLERS)
  return tuple(c for c in made if c is not None)


from xlps.models.controllers import act, early_exit, loop, recursion, routing  # noqa: E402

# Application order: enter runs first to last, leave last to first.
CONTROLLERS: tuple[type[Controller], ...] = (loop.Loop, routing.Routing, early_exit.EarlyExit,
                                             act.ACT, recursion.Recursion)
# Every metric a controller reports (the trainer logs those present as train_ / eval_).
METRICS: tuple[str, ...] = tuple(dict.fromkeys(m for c in CONTROLLERS for m in c.metrics))
