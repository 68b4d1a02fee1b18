"""The depth-controller protocol: a new depth method is one module plus one registry line.

``Gate`` below is such a method, written the way a user would add one: a learned scalar
per applied layer scaling the layer's update, a count of the layers it saw, a loss term and
a metric. Registered with one line (monkeypatched into ``CONTROLLERS``), it runs inside the
one scan with its parameter in the block, the same in the unrolled reference, and the
trainer adds its term to the loss and logs its metric, with no other file changed.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from helpers import tiny
from xlps import models, train
from xlps.models import controllers

WEIGHT = 0.25


@struct.dataclass
class GateState:
  layers: jax.Array
  total: jax.Array


class LayerScales(nn.Module):
  """One learned scalar per applied layer (initialised to 0.5); returns layer ``index``'s."""

  num_layers: int

  @nn.compact
  def __call__(self, index):
    return self.param("scales", nn.initializers.constant(0.5), (self.num_layers,))[index]


@dataclasses.dataclass(frozen=True)
class Gate(controllers.Controller):
  name = "gate"
  metrics = ("gate_mean",)

  @classmethod
  def make(cls, spec, deterministic, decoding):
    return cls(spec)

  def start(self, x, ctx):
    return GateState(jnp.int32(0), jnp.float32(0))

  def leave(self, x, x_before, step, states):
    scale = LayerScales(self.spec.num_layers, name="gate")(step["index"])
    state = states[self.name]
    return x_before + scale * (x - x_before), GateState(state.layers + 1, state.total + scale)

  def finish(self, x, state, ctx):
    return x, {"gate": state.total / state.layers}, {"gate_layers": state.layers}

  def report(self, sown, batch):
    mean = controllers.sown_sum(sown, "losses", "gate")
    return WEIGHT * mean, {"gate_mean": mean}


@pytest.fixture
def gated(monkeypatch):
  monkeypatch.setattr(controllers, "CONTROLLERS", (*controllers.CONTROLLERS, Gate))
  monkeypatch.setattr(controllers, "METRICS", (*controllers.METRICS, "gate_mean"))


def setup(scan_layers=True):
  m = tiny(num_layers=4, scan_layers=scan_layers)
  spec = models.spec_of(m)
  batch = models.example_batch(spec, batch_size=2, length=8)
  batch = {**batch, "targets": batch["inputs"], "weights": jnp.ones(batch["inputs"].shape)}
  return spec, batch


def test_a_registered_controller_runs_in_the_scan_and_reaches_the_trainer(gated):
  spec, batch = setup()
  model = models.build(spec)
  # model.init, not models.init_params: that one's jit cache is keyed by the spec alone and
  # would hand these parameters (or the plain ones) to other tests of the same spec.
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch)["params"])
  gate = params["decoder"]["layers"]["gate"]["scales"]  # in the block's scope, next to the layers
  np.testing.assert_array_equal(gate, 0.5)
  logits, sown = model.apply({"params": params}, batch, mutable=["losses", "intermediates"])
  assert int(sown["intermediates"]["decoder"]["gate_layers"][0]) == 4  # every applied layer
  # the unrolled reference: same parameters, same logits
  unrolled = models.build(models.spec_of(tiny(num_layers=4, scan_layers=False)))
  np.testing.assert_allclose(unrolled.apply({"params": params}, batch), logits, atol=1e-6)
  # the gate changes the model: at 1.0 the plain model's logits come back
  ones = {**params, "decoder": {**params["decoder"], "layers": {
      **params["decoder"]["layers"], "gate": {"scales": jnp.ones(4)}}}}
  plain_params = {**params, "decoder": {**params["decoder"], "layers": {
      k: v for k, v in params["decoder"]["layers"].items() if k != "gate"}}}
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(controllers, "CONTROLLERS", controllers.CONTROLLERS[:-1])
    plain = model.apply({"params": plain_params}, batch)
  np.testing.assert_allclose(model.apply({"params": ones}, batch, mutable=["losses"])[0], plain,
                             atol=1e-5)
  assert np.abs(np.asarray(logits) - np.asarray(plain)).max() > 1e-3
  # the trainer: loss = cross-entropy + WEIGHT * gate mean, the metric logged
  _, extras = train.apply_model(model, params, batch)
  assert float(extras["gate_mean"]) == pytest.approx(0.5)
  state = train.state_of(params, optax.sgd(0.1), 0)
  new_state, metrics = train.train_step(state, batch, model=model, optimizer=optax.sgd(0.1))
  assert float(metrics["gate_mean"]) == pytest.approx(0.5)
  ce = float(metrics["loss_sum"]) / float(metrics["tokens"])
  grad = (new_state.params["decoder"]["layers"]["gate"]["scales"] - gate) / -0.1
  assert np.all(np.abs(grad) > 0)  # the gate trains
  record = train.train_record(jax.device_get(metrics), 1)
  assert record["train_gate_mean"] == pytest.approx(0.5) and ce > 0


def test_iteration_start_work_runs_under_a_cond():
  """The injection adapter and the router are applied through ``lax.cond`` on the layer's
  ``starts``, so other layers skip their matmuls (a ``where`` would run them everywhere)."""
  m = tiny(num_layers=6)
  m.loop.update(prelude=1, core=2, coda=1, inject="adapter")
  m.routing.kind = "token_choice"
  spec = models.spec_of(m)
  model = models.build(spec)
  batch = models.example_batch(spec, batch_size=1, length=8)
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, batch))(params))
  assert jaxpr.count("cond[") >= 2  # the adapter's and the router's
