"""Mixture-of-Recursions routing over a looped core: capacity per iteration, routed-out
positions frozen, gradients to the routers, the causal inference path, token-choice depths
and losses against NumPy, cached decoding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xlps import config as config_lib
from xlps import models, train
from xlps.models import engine, transformer

from helpers import tiny

ITERATIONS, L = 3, 8


def routed_model(kind="expert_choice", core=2, scan_layers=True, **routing):
  m = tiny("decoder_lm", 1 + core * ITERATIONS + 1, scan_layers=scan_layers)
  m.loop.prelude, m.loop.core, m.loop.coda = 1, core, 1
  m.routing.kind = kind
  m.routing.update(routing)
  return m


def run(m, params, batch, deterministic=False, capture=False, seed=0):
  kwargs = {"capture_intermediates": lambda mdl, _: isinstance(mdl, engine.Block)} if capture else {}
  logits, aux = models.build(m).apply(
      {"params": params}, batch, deterministic=deterministic,
      rngs={"dropout": jax.random.PRNGKey(seed)}, mutable=["losses", "intermediates"], **kwargs)
  return logits, aux


def setup(m, seed=0, batch_size=3):
  spec = models.spec_of(m)
  params = nn.unbox(models.init_params(spec, seed))
  batch = models.example_batch(spec, batch_size, L, seed=seed + 1)
  return params, batch


@pytest.mark.parametrize("capacity,expect", [("", (8, 5, 3)), ("1,0.5,0.25", (8, 4, 2)),
                                             ("0.5,0.5,0.25", (4, 4, 2))])
def test_expert_choice_respects_capacity_per_iteration(capacity, expect):
  m = routed_model(capacity=capacity)
  params, batch = setup(m)
  _, aux = run(m, params, batch)
  routed = np.asarray(aux["intermediates"]["decoder"]["routed"][0])  # [R, B, L]
  np.testing.assert_array_equal(routed.sum(-1), np.broadcast_to(np.array(expect)[:, None], (3, 3)))
  assert np.all(routed[1:] <= routed[:-1])  # only positions kept at r - 1 are kept at r
  depth = np.asarray(aux["intermediates"]["decoder"]["depth"][0])
  np.testing.assert_array_equal(depth, routed.sum(0))


def test_padding_is_never_routed():
  m = routed_model(capacity="1,0.5,0.25")
  params, batch = setup(m)
  segments = np.ones((3, L), np.int32)
  segments[0, 5:] = 0
  _, aux = run(m, params, {**batch, "segment_ids": segments})
  routed = np.asarray(aux["intermediates"]["decoder"]["routed"][0])
  assert not routed[:, 0, 5:].any()
  np.testing.assert_array_equal(routed[:, 0].sum(-1), [5, 4, 2])


@pytest.mark.parametrize("kind", ["expert_choice", "token_choice"])
def test_routed_out_positions_stop_changing(kind):
  """Per-layer states (unrolled): a position not routed through iteration r keeps, bitwise,
  its state from the end of iteration r - 1 through every later core layer."""
  m = routed_model(kind, scan_layers=False)
  params, batch = setup(m, seed=1)
  _, aux = run(m, params, batch, capture=True)
  states = [np.asarray(out[0]) for out in
            aux["intermediates"]["decoder"]["layers"]["__call__"]]  # after each applied layer
  routed = np.asarray(aux["intermediates"]["decoder"]["routed"][0])
  assert routed.sum() < routed.size  # some positions leave early
  for r in range(ITERATIONS):
    before = states[2 * r]  # the state entering iteration r (layers 2r+1, 2r+2 run it)
    for b, p in zip(*np.nonzero(~routed[r])):
      for layer in range(2 * r + 1, 1 + 2 * ITERATIONS):
        np.testing.assert_array_equal(states[layer][b, p], before[b, p])
    moved = routed[r] & ~np.all(states[2 * r + 2] == before, axis=-1)
    np.testing.assert_array_equal(moved, routed[r])  # the routed ones all change
  scanned = routed_model(kind)
  np.testing.assert_allclose(run(scanned, params, batch)[0], run(m, params, batch)[0],
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["expert_choice", "token_choice"])
def test_gradients_flow_to_the_router(kind):
  m = routed_model(kind, aux_weight=0.0, balance_weight=0.0, z_weight=0.0)
  params, batch = setup(m)

  def loss(params):  # cross-entropy only: the router learns through its gates
    logits = run(m, params, batch)[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["inputs"]).mean()

  router = jax.grad(loss)(params)["decoder"]["layers"]["router"]
  kernel = np.asarray(router["kernel"])
  if kind == "expert_choice":  # one router per iteration, each with a gradient
    assert kernel.shape == (ITERATIONS, 16, 1)
    assert np.all(np.abs(kernel).reshape(ITERATIONS, -1).max(-1) > 0)
  else:
    assert kernel.shape == (16, ITERATIONS) and np.abs(kernel).max() > 0


def test_threshold_inference_is_causal_and_top_k_is_not():
  m = routed_model()
  params, batch = setup(m, seed=2)
  tokens = np.asarray(batch["inputs"])
  cut = 4
  rng = np.random.default_rng(0)
  forward = {}
  for rule in ("threshold", "top_k"):
    m.routing.inference = rule
    forward[rule] = jax.jit(models.build(m).apply)
  changed = {rule: 0 for rule in forward}
  for _ in range(6):
    other = tokens.copy()
    other[:, cut:] = rng.integers(1, 32, other[:, cut:].shape)
    for rule, apply in forward.items():
      a = apply({"params": params}, {"inputs": tokens})[:, :cut]
      b = apply({"params": params}, {"inputs": other})[:, :cut]
      changed[rule] += int(not np.array_equal(a, b))
  assert changed["threshold"] == 0  # earlier logits never depend on later tokens
  assert changed["top_k"] > 0       # the training rule ranks the whole sequence


def test_threshold_keeps_positions_above_one_half():
  m = routed_model(capacity="1,0.5,0.25")
  m.routing.inference = "threshold"
  params, batch = setup(m, seed=3)
  # Push the iteration-1 and -2 routers to always / never: bias +-50.
  bias = params["decoder"]["layers"]["router"]["bias"]
  params["decoder"]["layers"]["router"]["bias"] = bias.at[1, 0].set(50.0).at[2, 0].set(-50.0)
  _, aux = run(m, params, batch, deterministic=True)
  routed = np.asarray(aux["intermediates"]["decoder"]["routed"][0])
  assert routed[0].all() and routed[1].all() and not routed[2].any()  # capacity not applied


def test_token_choice_depths_and_losses_match_numpy():
  m = routed_model("token_choice", scan_layers=False, balance_weight=0.5, z_weight=0.1)
  params, batch = setup(m, seed=4)
  _, aux = run(m, params, batch, capture=True)
  prelude = np.asarray(aux["intermediates"]["decoder"]["layers"]["__call__"][0][0], np.float64)
  router = params["decoder"]["layers"]["router"]
  logits = prelude @ np.asarray(router["kernel"], np.float64) + np.asarray(router["bias"])
  depth = np.asarray(aux["intermediates"]["decoder"]["depth"][0])
  np.testing.assert_array_equal(depth, logits.argmax(-1) + 1)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  fraction = np.eye(ITERATIONS)[logits.argmax(-1)].reshape(-1, ITERATIONS).mean(0)
  balance = ITERATIONS * np.sum(fraction * probs.reshape(-1, ITERATIONS).mean(0))
  lse = np.log(np.exp(logits).sum(-1))
  expect = 0.5 * balance + 0.1 * np.mean(lse ** 2)
  np.testing.assert_allclose(float(aux["losses"]["decoder"]["router"][0]), expect, rtol=1e-5)


def test_train_step_adds_the_router_loss_and_logs_depth():
  m = routed_model(aux_weight=0.5)
  spec = models.spec_of(m)
  params, batch = setup(m)
  batch = {"inputs": batch["inputs"], "targets": batch["inputs"],
           "weights": np.ones((3, L), np.float32)}
  model = models.build(spec)
  optimizer = train.make_optimizer(config_lib.train_config())
  state = train.state_of(params, optimizer, 0)
  step = jax.jit(lambda state, batch: train.train_step(state, batch, model=model,
                                                       optimizer=optimizer))
  _, metrics = step(state, batch)
  logits, extras = train.apply_model(model, params, batch, deterministic=False,
                                     rngs={"dropout": jax.random.fold_in(state.rng, 0)})
  ce = train.loss_and_metrics(logits, batch["targets"], batch["weights"])[0]
  assert float(metrics["router_loss"]) > 0
  np.testing.assert_allclose(float(metrics["router_loss"]), float(extras["router_loss"]),
                             rtol=1e-6)
  np.testing.assert_allclose(float(metrics["loss_sum"] / metrics["tokens"]), float(ce),
                             rtol=1e-6)
  assert float(metrics["depth"]) == pytest.approx((8 + 5 + 3) / 8)


@pytest.mark.parametrize("kind", ["expert_choice", "token_choice"])
def test_cached_decoding_equals_recomputation(kind):
  m = routed_model(kind, capacity="1,0.5,0.5" if kind == "expert_choice" else "")
  spec = models.spec_of(m)
  params, batch = setup(m, seed=5, batch_size=2)
  tokens = jnp.asarray(batch["inputs"])
  module = models.build(spec)
  full = module.apply({"params": params}, {"inputs": tokens})
  apply = jax.jit(lambda chunk, cache: module.apply({"params": params}, {"inputs": chunk},
                                                    cache=cache))
  logits, cache = apply(tokens[:, :3], transformer.init_cache(spec, 2, L))
  steps = [logits]
  for t in range(3, L):
    logits, cache = apply(tokens[:, t:t + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def test_decoding_refuses_top_k_routing():
  m = routed_model(inference="top_k")
  spec = models.spec_of(m)
  params, batch = setup(m)
  with pytest.raises(ValueError, match="inference='threshold'"):
    models.build(spec).apply({"params": params}, {"inputs": batch["inputs"][:, :2]},
                             cache=transformer.init_cache(spec, 3, L))


@pytest.mark.parametrize("change,match", [
    ({"loop_core": 0}, "model.routing.kind='expert_choice' routes positions through a looped"),
    ({"capacity": "1,0.5"}, "needs 3 fractions"),
    ({"capacity": "0.5,1,0.5"}, "non-increasing"),
    ({"capacity": "1,0.5,x"}, "not a list of fractions"),
    ({"kind": "token_choice", "capacity": "1,1,1"}, "only read with kind='expert_choice'"),
    ({"kind": "depth"}, "model.routing.kind='depth' is not valid"),
    ({"train_iterations": "uniform"}, "train_iterations='fixed'"),
])
def test_bad_routing_config_names_the_field(change, match):
  m = routed_model()
  if "loop_core" in change:
    m.loop.prelude = m.loop.core = m.loop.coda = 0
  elif "train_iterations" in change:
    m.loop.train_iterations = change["train_iterations"]
  else:
    m.routing.update(change)
  with pytest.raises(config_lib.ConfigError, match=match):
    models.spec_of(m)


# ------------------------------------------ gating against the MoR reference code in NumPy


def _np_layer(x, lp, slot, mask):
  """One pre-LN layer of the tiny config (slot ``slot`` of 4) in float64 NumPy."""
  from test_reference import attention, layernorm, mlp, residual, take
  norm = lambda h, q: layernorm(h, q, 1e-6)  # noqa: E731
  a, f, n = (take(lp[c], 4, slot) for c in ("attention", "mlp", "norms"))
  x = residual(x, lambda h: attention(h, h, mask, a, 4, 4), n["attention"], norm, True)
  return residual(x, lambda h: mlp(h, f, "gelu"), n["mlp"], norm, True)


def _np_mor(p, tokens, kind, gating, alpha, capacity):
  """The routed model written from the MoR code's formulas: expert-choice (per iteration r,
  among the positions kept at r - 1 the top capacity[r] x L by s = sigmoid(router_r(H)))
  ``H + alpha s f(H)``; token-choice (depth d = argmax softmax(router(x)) + 1, weight p_d)
  ``x + p_d f^d(x)``; ``interpolate``: ``H + g (f(H) - H)`` at the gated iterations."""
  from test_reference import causal, layernorm
  b, length = tokens.shape
  emb, lp = p["embedder"], p["decoder"]["layers"]
  mask = np.broadcast_to(causal(length), (b, length, length))
  h = _np_layer(emb["embedding"][tokens] + emb["position_embedding"][:length][None], lp, 0, mask)
  router = lp["router"]

  def core(h, run):  # positions not running keep their state through every core layer
    f = h
    for j in range(2):
      f = np.where(run[..., None], _np_layer(f, lp, 1 + j, mask), h)
    return f

  if kind == "token_choice":
    logits = h @ router["kernel"] + router["bias"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    depth, weight = logits.argmax(-1) + 1, probs.max(-1)[..., None]
    x = h
    for r in range(ITERATIONS):
      run = r < depth
      f = core(h, run)
      last = (run & (r == depth - 1))[..., None]
      gated = x + weight * f if gating == "residual" else h + weight * (f - h)
      h = np.where(last, gated, f)
  else:
    active = np.ones((b, length), bool)
    for r in range(ITERATIONS):
      s = 1 / (1 + np.exp(-(h @ router["kernel"][r] + router["bias"][r])[..., 0]))
      k = max(1, round(capacity[r] * length))
      score = np.where(active, s, -1.0)
      rank = np.argsort(np.argsort(-score, axis=-1, kind="stable"), axis=-1, kind="stable")
      run = active & (rank < k)
      f = core(h, run)
      gated = h + alpha * s[..., None] * f if gating == "residual" else h + s[..., None] * (f - h)
      h = np.where(run[..., None], gated, h)
      active = run
  h = _np_layer(h, lp, 3, mask)
  return layernorm(h, p["final_norm"], 1e-6) @ emb["embedding"].T


@pytest.mark.parametrize("gating", ["residual", "interpolate"])
@pytest.mark.parametrize("kind", ["expert_choice", "token_choice"])
def test_gating_matches_the_reference_formulas_in_numpy(kind, gating):
  from test_reference import random_params
  capacity = (1.0, 0.5, 0.25)
  extra = {"capacity": "1,0.5,0.25", "alpha": 0.3} if kind == "expert_choice" else {}
  if gating == "interpolate":
    extra.pop("alpha", None)
  m = routed_model(kind, gating=gating, **extra)
  params, p64 = random_params(models.spec_of(m), seed=9)
  tokens = np.random.default_rng(4).integers(1, 32, (3, L))
  got = run(m, params, {"inputs": jnp.asarray(tokens)})[0]
  want = _np_mor(p64, tokens, kind, gating, 0.3, capacity)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["expert_choice", "token_choice"])
@pytest.mark.parametrize("init,inject", [("prelude", "none"), ("prelude", "add"),
                                         ("zeros", "add"), ("random", "adapter")])
def test_routing_decisions_depend_on_the_tokens(kind, init, inject):
  """The router reads the state entering the recursion after re-injection: at iteration 0
  its decisions differ between token sequences under every allowed initial state (reading
  a zero / random initial state it would decide by position alone)."""
  m = routed_model(kind, **({"capacity": "0.5,0.5,0.25"} if kind == "expert_choice" else {}))
  m.loop.init_state, m.loop.inject = init, inject
  spec = models.spec_of(m)
  params = nn.unbox(models.init_params(spec))
  first = []
  for seed in (1, 2):
    tokens = np.random.default_rng(seed).integers(1, 32, (3, L))
    aux = run(m, params, {"inputs": jnp.asarray(tokens)})[1]["intermediates"]["decoder"]
    first.append(np.asarray(aux["routed"][0][0] if kind == "expert_choice" else aux["depth"][0]))
  assert not np.array_equal(first[0], first[1]), first
  assert all(len(np.unique(decision)) > 1 for decision in first), first


@pytest.mark.parametrize("init", ["zeros", "random"])
def test_a_core_that_never_sees_the_input_is_refused(init):
  m = routed_model("token_choice")
  m.loop.init_state = init
  with pytest.raises(config_lib.ConfigError,
                     match=f"model.loop.init_state='{init}' with model.loop.inject='none'"):
    models.spec_of(m)
