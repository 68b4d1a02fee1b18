"""Latent recursion with deep supervision (xlps.models.controllers.recursion) against an
independent reference: TRM / HRM's loop written out in Python around the plain stack."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xlps import config as config_lib
from xlps import models, train
from xlps.models import engine, transformer
from xlps.models.controllers import recursion
from xlps.models.losses import token_nll

LENGTH, VOCAB = 8, 6


def puzzle_config(n=2, cycles=2, net_layers=2, **recursion_keys):
  config = config_lib.base_config()
  m = config.model
  m.update(family="puzzle", vocab_size=VOCAB, d_model=16, num_heads=2, d_ff=32, max_len=LENGTH,
           norm="rmsnorm", norm_position="post", tie_embeddings=False)
  m.recursion.update(net_layers=net_layers, latent_steps=n, cycles=cycles, **recursion_keys)
  m.num_layers = cycles * (n + 1) * net_layers
  return config


def plain_net(spec):
  """The net alone: a recursion-free puzzle spec of ``net_layers`` layers, one slot each."""
  config = puzzle_config()
  m = config.model
  m.recursion = config_lib.recursion_config()
  m.update(num_layers=spec.recursion.net_layers, d_model=spec.d_model, num_heads=spec.num_heads,
           d_ff=spec.d_ff)
  m.sharing.update(num_unique=spec.recursion.net_layers, order="sequence")
  return models.spec_of(config)


def reference(spec, params, batch, y, z):
  """TRM / HRM written out: ``z <- net(z + y + x)`` n times then ``y <- net(y + z)``, T
  cycles; every application but the trained tail (last cycle, or the last z and y updates)
  runs on stop_gradient'ed parameters and inputs, and its output is detached."""
  r = spec.recursion
  plain = plain_net(spec)
  k = r.net_layers
  valid = batch["inputs"] != 0
  mask = transformer.layers.make_attention_mask(jnp.ones_like(valid), valid)
  embed = transformer.Embedder(spec).apply({"params": params["embedder"]}, batch["inputs"])
  embed = embed * math.sqrt(spec.d_model / 2)  # TRM's input scale

  def net(p, h, y_update):
    layers = p["net"]["layers"]
    if r.separate_nets:  # HRM: slots 0..k-1 are the L net, k..2k-1 the H net
      part = slice(k, 2 * k) if y_update else slice(0, k)
      layers = jax.tree.map(lambda a: a[part], layers)
    return engine.Stack(plain).apply({"params": {"layers": layers}}, h, plan=plain.stacks[0],
                                     mask=mask)

  applications = [(c, i) for c in range(r.cycles) for i in range(r.latent_steps + 1)]
  trained = r.latent_steps + 1 if r.gradient == "last_cycle" else 2
  for a, (_, i) in enumerate(applications):
    tail = a >= len(applications) - trained
    if a == len(applications) - trained:
      y, z = jax.lax.stop_gradient(y), jax.lax.stop_gradient(z)
    p = params if tail else jax.lax.stop_gradient(params)
    e = embed if tail else jax.lax.stop_gradient(embed)
    if i < r.latent_steps:
      z = net(p, z + y + e, False)
    else:
      y = net(p, y + z, True)
  logits = transformer.OutputHead(spec).apply({"params": params["head"]}, y, None)
  pooled = y.mean(1)
  q = pooled @ params["halting_head"]["kernel"] + params["halting_head"]["bias"]
  return logits, q, (y, z)


def setup(config, seed=0):
  spec = models.spec_of(config)
  model = models.build(spec)
  rng = np.random.default_rng(seed)
  batch = {"inputs": jnp.asarray(rng.integers(1, VOCAB, (3, LENGTH)), jnp.int32),
           "targets": jnp.asarray(rng.integers(1, VOCAB, (3, LENGTH)), jnp.int32),
           "weights": jnp.ones((3, LENGTH), jnp.float32)}
  params = jax.jit(model.init)(jax.random.PRNGKey(seed), batch)["params"]
  params = jax.tree.map(lambda a: a.unbox() if hasattr(a, "unbox") else a, params,
                        is_leaf=lambda a: hasattr(a, "unbox"))
  # The halting head starts at zero: give it weights so that its gradient is exercised.
  params["halting_head"]["kernel"] = jnp.asarray(rng.normal(size=(spec.d_model, 2)),
                                                 jnp.float32)
  y, z = (jnp.asarray(rng.normal(size=(3, LENGTH, spec.d_model)), jnp.float32) for _ in "yz")
  return spec, model, params, batch, y, z


@pytest.mark.parametrize("keys", [
    {"net_layers": 1},
    pytest.param({"gradient": "one_step", "separate_nets": True}, marks=pytest.mark.slow)],
    ids=["trm_last_cycle", "hrm_one_step_separate_nets"])
def test_one_supervision_step_equals_the_written_out_recursion(keys):
  """Forward (logits, q, carry) and the parameter gradient of one supervision step equal
  the reference, whose no-grad cycles run on stop_gradient'ed parameters: they contribute
  nothing, and the trained tail contributes the reference gradient. The gradient into the
  carried-in (y, z) is exactly zero: it reaches the output only through the no-grad
  cycles (the carry is detached between supervision steps)."""
  spec, model, params, batch, y, z = setup(puzzle_config(**keys))
  trained = 3 * 1 if keys.get("net_layers") == 1 else 2 * 2  # last cycle / last z, y updates
  assert spec.recursion.no_grad_layers == spec.num_layers - trained
  weights = [jnp.asarray(np.random.default_rng(s).normal(size=shape), jnp.float32)
             for s, shape in ((1, (3, LENGTH, VOCAB)), (2, (3, 2)), (3, (3, LENGTH, 16)))]

  def scalar(out):
    logits, q, (y_out, z_out) = out
    return (logits * weights[0]).sum() + (q * weights[1]).sum() + (y_out * weights[2]).sum()

  def ours(p, y, z):
    logits, q, carried = model.apply({"params": p}, batch, carried={"recursion": (y, z)})
    return logits, q, carried["recursion"]

  # Each side's forward and gradient as one jitted program (op by op is many times slower).
  got, (grads, carry_grads) = jax.jit(lambda p, c: (ours(p, *c), jax.grad(
      lambda p, c: scalar(ours(p, *c)), argnums=(0, 1))(p, c)))(params, (y, z))
  want, want_grads = jax.jit(lambda p: (reference(spec, p, batch, y, z), jax.grad(
      lambda p: scalar(reference(spec, p, batch, y, z)))(p)))(params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
  assert all(float(jnp.abs(g).max()) == 0.0 for g in carry_grads)
  assert float(jnp.abs(grads["net"]["layers"]["mlp"]["wi"]["kernel"]).max()) > 0


def test_deep_supervision_is_one_update_per_step_on_the_detached_carry():
  """Two supervision steps of ``train_step`` with SGD equal two hand-made updates: step 1
  from the fresh carry, step 2 from step 1's carry (computed with the parameters before
  its update, detached), each on the mean over examples of (cell-mean CE + 0.5 BCE(q_halt,
  exact))."""
  config = puzzle_config(n=1, cycles=1, net_layers=1, supervision_steps=2,
                         halt_exploration=0.0)
  spec, model, params, batch, _, _ = setup(config)
  lr = 0.1
  optimizer = optax.sgd(lr)
  state = train.state_of(params, optimizer, seed=0)
  new_state, metrics = jax.jit(lambda st: recursion.train_step(st, batch, model=model,
                                                               optimizer=optimizer))(state)

  def loss(p, carried):
    logits, q, new = model.apply({"params": p}, batch, carried=carried)
    ce = token_nll(logits, batch["targets"]).mean(-1)
    exact = jnp.all(logits.argmax(-1) == batch["targets"], -1).astype(jnp.float32)
    bce = jnp.logaddexp(0.0, q[:, 0]) - q[:, 0] * exact
    return (ce + 0.5 * bce).mean(), new

  carried = {"recursion": recursion.initial_carry((3, LENGTH, spec.d_model), jnp.float32)}
  p = params
  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  for _ in range(2):
    (_, new), g = step(p, carried)
    p = jax.tree.map(lambda a, b: a - lr * b, p, g)
    carried = jax.lax.stop_gradient(new)
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(p)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(metrics["supervision_steps"]) == 2.0
  assert float(metrics["sequences"]) == 6.0  # 3 examples x 2 steps


def test_halting_targets_and_rules_by_hand():
  q = jnp.asarray([[2.0, -1.0], [0.5, 1.0]])
  exact = jnp.asarray([True, False])
  next_q = jnp.asarray([[0.3, 0.7], [-1.0, -2.0]])
  sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731

  def bce(logit, target):
    return -(target * math.log(sig(logit)) + (1 - target) * math.log(1 - sig(logit)))

  # TRM: BCE(q_halt, exact); halts at q_halt > 0.
  np.testing.assert_allclose(recursion.halting_loss(q, exact, None, False, "bce"),
                             [bce(2.0, 1), bce(0.5, 0)], rtol=1e-6)
  assert recursion.halts(q, "bce").tolist() == [True, True]
  # HRM: + BCE(q_continue, sigmoid(max(next q))), at the last step sigmoid(next q_halt);
  # halts at q_halt > q_continue.
  np.testing.assert_allclose(
      recursion.halting_loss(q, exact, next_q, False, "q_learning"),
      [bce(2.0, 1) + bce(-1.0, sig(0.7)), bce(0.5, 0) + bce(1.0, sig(-1.0))], rtol=1e-6)
  np.testing.assert_allclose(
      recursion.halting_loss(q, exact, next_q, True, "q_learning"),
      [bce(2.0, 1) + bce(-1.0, sig(0.3)), bce(0.5, 0) + bce(1.0, sig(-1.0))], rtol=1e-6)
  assert recursion.halts(q, "q_learning").tolist() == [True, False]
  assert recursion.halts(q, "none").tolist() == [False, False]
  # "exactly right" counts scored cells only: a wrong weight-0 cell does not matter.
  logits = jax.nn.one_hot(jnp.asarray([[1, 2, 3], [1, 2, 3]]), 4)
  batch = {"targets": jnp.asarray([[1, 2, 0], [1, 0, 3]]),
           "weights": jnp.asarray([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])}
  cells, right, exact = recursion._cells(logits, batch)
  assert cells.tolist() == [2.0, 3.0] and right.tolist() == [2.0, 2.0]
  assert exact.tolist() == [True, False]


def test_stablemax_and_the_parameter_ema_against_float64():
  logits = np.random.default_rng(0).normal(size=(2, 3, 5)) * 3
  targets = np.asarray([[0, 4, 2], [1, 1, 3]])
  s = np.where(logits >= 0, logits + 1, 1 / (1 - np.minimum(logits, 0)))
  want = -np.log(np.take_along_axis(s / s.sum(-1, keepdims=True), targets[..., None], -1)[..., 0])
  np.testing.assert_allclose(token_nll(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                                       "stablemax_cross_entropy"), want, rtol=1e-5)
  t = config_lib.train_config()
  t.update(ema_decay=0.9, grad_clip_norm=0.0, weight_decay=0.0, learning_rate=0.1,
           warmup_steps=0, decay_steps=10)
  optimizer = train.make_optimizer(t)
  params = {"w": {"kernel": jnp.asarray([1.0, -2.0])}}
  state = train.state_of(params, optimizer, seed=0)
  ema, p = np.asarray([1.0, -2.0], np.float64), params
  for g in ([0.5, 1.0], [-1.0, 0.25]):
    updates, opt_state = optimizer.update({"w": {"kernel": jnp.asarray(g)}}, state.opt_state, p)
    p = optax.apply_updates(p, updates)
    state = state.replace(params=p, opt_state=opt_state)
    ema = 0.9 * ema + 0.1 * np.asarray(p["w"]["kernel"], np.float64)
  np.testing.assert_allclose(train.eval_params(state)["w"]["kernel"], ema, rtol=1e-6)
  assert train.eval_params(train.state_of(params, optax.sgd(0.1), 0)) is params


def test_recursion_config_errors_name_the_field():
  config = puzzle_config()
  config.model.num_layers = 7
  with pytest.raises(config_lib.ConfigError, match=r"model.num_layers=7.*valid: model.num_layers=12"):
    models.spec_of(config)
  config = puzzle_config()
  config.model.family = "encoder_mlm"
  with pytest.raises(config_lib.ConfigError, match="model.recursion.net_layers=2 needs model.family='puzzle'"):
    models.spec_of(config)
  config = puzzle_config(halting="maybe")
  with pytest.raises(config_lib.ConfigError, match="model.recursion.halting"):
    models.spec_of(config)


@pytest.mark.slow
def test_trm_run_resumes_exactly_and_shards_like_data_parallel(tmp_path, data_dir):
  """A 4x4 Sudoku TRM run (deep supervision, halting, EMA in the optimizer state): stopped
  at step 2 and resumed to 4, it logs the losses of the straight run and ends with its
  state, bitwise; with its parameters and optimizer state sharded (data x fsdp = 2 x 4
  instead of data parallel over the 8 devices) it logs the same losses."""
  from configs import puzzle
  from helpers import logged_losses

  config = puzzle.get_config("size=4,runlocal")
  m, d, t = config.model, config.data, config.train
  m.d_model, m.num_heads, m.d_ff = 16, 2, 32
  m.recursion.update(latent_steps=1, cycles=2, supervision_steps=3)
  m.num_layers = 2 * 2 * 2
  d.data_dir, d.num_train_examples, d.num_eval_examples = str(data_dir), 64, 16
  t.update(batch_size=8, num_steps=4, decay_steps=4, warmup_steps=1, log_every_steps=1,
           eval_every_steps=4, checkpoint_every_steps=2, async_checkpoints=False)
  full = train.train_and_evaluate(config, tmp_path / "full")
  t.num_steps = 2
  train.train_and_evaluate(config, tmp_path / "split")
  t.num_steps = 4
  resumed = train.train_and_evaluate(config, tmp_path / "split")
  assert logged_losses(tmp_path / "full") == logged_losses(tmp_path / "split")
  for a, b in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(resumed["state"])):
    np.testing.assert_array_equal(a, b)
  assert train.eval_params(full["state"]) is not full["state"].params  # the EMA was kept
  config.mesh.data, config.mesh.fsdp = 2, 4
  sharded = train.train_and_evaluate(config, tmp_path / "sharded")
  want = logged_losses(tmp_path / "full")
  got = logged_losses(tmp_path / "sharded")
  assert sorted(got) == sorted(want) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=2e-4)
  np.testing.assert_allclose(sharded["last_eval"]["eval_accuracy"],
                             full["last_eval"]["eval_accuracy"], atol=1e-6)
