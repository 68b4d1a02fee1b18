"""Looped depth (prelude / iterated core / coda in one scan) and randomized depth."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import tiny
from xlps import config as config_lib
from xlps import models
from xlps.models.controllers import loop as loop_controller

# prelude 2, core 2 x up to 3 iterations, coda 1: N = 2 + 2 * 3 + 1 = 9 applied layers.
LOOP = dict(prelude=2, core=2, coda=1)


def looped(num_layers=9, **loop):
  m = tiny("decoder_lm", num_layers)
  m.loop.update({**LOOP, **loop})
  return models.spec_of(m)


def table_model(table):
  """The same model written as a plain sharing table (no loop section)."""
  return models.spec_of(tiny("decoder_lm", len(table.split()),
                             sharing={"order": "table", "table": table, "num_unique": 0}))


def test_plan_is_the_looped_table():
  spec = looped()
  assert spec.stack("decoder").plans["attention"].slots == (0, 1, 2, 3, 2, 3, 2, 3, 4)
  assert spec.loop.max_iterations == 3


@pytest.mark.parametrize("iterations,table", [(3, "0 1 2 3 2 3 2 3 4"), (1, "0 1 2 3 4"),
                                              (2, "0 1 2 3 2 3 4")])
def test_fixed_depth_with_all_backprop_is_the_plain_model_bitwise(iterations, table):
  """Masked iterations leave the state bitwise as it is: a loop run for r iterations is the
  plain table model with r core repeats, outputs and gradients."""
  spec = looped(mean_iterations=iterations)
  params = nn.unbox(models.init_params(spec))
  batch = models.example_batch(spec, 2, 8)
  f = lambda s: lambda p: models.build(s).apply({"params": p}, batch)  # noqa: E731
  got, want = f(spec)(params), f(table_model(table))(params)
  np.testing.assert_array_equal(got, want)
  g1 = jax.grad(lambda p: f(spec)(p).std())(params)
  g2 = jax.grad(lambda p: f(table_model(table))(p).std())(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_array_equal(a, b)


def test_sampled_depths_compile_once():
  """Training samples the iterations inside the step: one trace for every depth."""
  spec = looped(train_iterations="uniform", mean_iterations=2)
  params = nn.unbox(models.init_params(spec))
  batch = models.example_batch(spec, 2, 8)
  traces = []

  @jax.jit
  def loss(p, key):
    traces.append(1)
    logits, aux = models.build(spec).apply({"params": p}, batch, deterministic=False,
                                           rngs={"dropout": key}, mutable=["intermediates"])
    return logits.mean(), aux["intermediates"]["decoder"]["iterations"][0]

  depths = {int(loss(params, jax.random.PRNGKey(i))[1]) for i in range(12)}
  assert depths == {1, 2, 3} and len(traces) == 1


def test_truncated_backprop_gives_early_iterations_zero_gradient():
  """With k = 1 the state entering the last iteration is cut: the embedding and the prelude
  (which reach the loss only through earlier iterations, no re-injection, untied head) get
  exactly zero gradient, the core and coda do not; with k = all everything does."""
  def grads(k):
    m = tiny("decoder_lm", 9, tie_embeddings=False)
    m.loop.update(**LOOP, backprop_iterations=k)
    spec = models.spec_of(m)
    params = nn.unbox(models.init_params(spec))
    batch = models.example_batch(spec, 2, 8)
    return jax.grad(lambda p: models.build(spec).apply({"params": p}, batch).std())(params)

  for k, early_zero in ((1, True), (0, False)):
    g = grads(k)
    early = [g["embedder"]["embedding"]] + [
        leaf[:LOOP["prelude"]] for leaf in jax.tree.leaves(g["decoder"]["layers"]["mlp"])]
    later = [leaf[LOOP["prelude"]:] for leaf in jax.tree.leaves(g["decoder"]["layers"]["mlp"])]
    assert all(np.all(np.asarray(x) == 0) for x in early) == early_zero
    assert all(np.any(np.asarray(x) != 0) for x in later)


def test_truncation_changes_only_gradients_through_the_cut():
  """k = 1 at r = 3 drops the first two iterations' share of the core's gradient, but the
  coda's gradient (its inputs and outputs are the same forward values) is unchanged."""
  spec = looped(backprop_iterations=1, inject="add")
  params = nn.unbox(models.init_params(spec))
  batch = models.example_batch(spec, 2, 8)
  got = jax.grad(lambda p: models.build(spec).apply({"params": p}, batch).std())(params)
  full = looped(inject="add")
  want = jax.grad(lambda p: models.build(full).apply({"params": p}, batch).std())(params)
  # Truncation changes the core's gradient (it drops two iterations' contributions) ...
  core = lambda g: np.asarray(g["decoder"]["layers"]["mlp"]["wo"]["kernel"][2:4])  # noqa: E731
  assert not np.allclose(core(got), core(want))
  # ... but never the coda's or the output head's, which see the same forward values.
  np.testing.assert_allclose(np.asarray(got["decoder"]["layers"]["mlp"]["wo"]["kernel"][4]),
                             np.asarray(want["decoder"]["layers"]["mlp"]["wo"]["kernel"][4]),
                             rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("inject,init", [("add", "zeros"), ("adapter", "random"),
                                         ("none", "prelude")])
def test_any_depth_at_evaluation_with_the_same_parameters(inject, init):
  spec = looped(inject=inject, init_state=init)
  params = nn.unbox(models.init_params(spec))
  batch = models.example_batch(spec, 2, 8)
  apply = jax.jit(lambda p, r: models.build(spec).apply({"params": p}, batch, iterations=r))
  outs = [apply(params, r) for r in (1, 2, 3)]
  assert all(np.all(np.isfinite(o)) for o in outs)
  assert not np.allclose(outs[0], outs[2])
  assert apply._cache_size() == 1
  if inject == "adapter":
    assert params["decoder"]["layers"]["adapter"]["kernel"].shape == (32, 16)


def test_sample_iterations_distributions():
  lp = looped(train_iterations="poisson_lognormal", mean_iterations=2, num_layers=2 + 2 * 3 + 1).loop
  draws = np.asarray(jax.vmap(lambda k: loop_controller.sample_iterations(k, lp))(
      jax.random.split(jax.random.PRNGKey(0), 4000)))
  assert draws.min() >= 1 and draws.max() <= 3 and len(set(draws.tolist())) == 3
  lp = looped(train_iterations="uniform", mean_iterations=2).loop
  draws = np.asarray(jax.vmap(lambda k: loop_controller.sample_iterations(k, lp))(
      jax.random.split(jax.random.PRNGKey(1), 3000)))
  np.testing.assert_allclose(np.bincount(draws, minlength=4)[1:] / 3000, [1 / 3] * 3, atol=0.04)


@pytest.mark.parametrize("loop,needles", [
    (dict(core=2, prelude=1, coda=1), ["model.num_layers=9", "prelude 1 + core 2", "4, 6, 8"]),
    (dict(core=2, mean_iterations=9, prelude=2, coda=1), ["model.loop.mean_iterations=9",
                                                          "0..3"]),
    (dict(core=2, prelude=2, coda=1, inject="concat"), ["model.loop.inject='concat'",
                                                        "none, add, adapter"]),
])
def test_bad_loop_configs(loop, needles):
  m = tiny("decoder_lm", 9)
  m.loop.update(loop)
  with pytest.raises(config_lib.ConfigError) as err:
    models.spec_of(m)
  for needle in needles:
    assert needle in str(err.value), (needle, str(err.value))


def test_loop_needs_default_sharing_and_no_act_and_one_stack():
  m = tiny("decoder_lm", 9, sharing={"num_unique": 3})
  m.loop.update(LOOP)
  with pytest.raises(config_lib.ConfigError, match="defines the sharing table"):
    models.spec_of(m)
  m = tiny("decoder_lm", 9)
  m.loop.update(LOOP)
  m.act.enabled = True
  with pytest.raises(config_lib.ConfigError, match="enable one of them"):
    models.spec_of(m)
  m = tiny("encoder_decoder", 9)
  m.loop.update(LOOP)
  with pytest.raises(config_lib.ConfigError, match="one-stack family"):
    models.spec_of(m)


def test_early_exit_freezes_positions_and_reports_depth():
  """A threshold no change can beat exits every position after its second iteration:
  the output is then the 2-iteration model's bitwise, and the mean depth is 2; threshold
  0 never exits. Exit applies at inference only."""
  m = tiny("decoder_lm", 9)
  m.loop.update(**LOOP, exit_threshold=1e9)
  spec = models.spec_of(m)
  params = nn.unbox(models.init_params(spec))
  batch = models.example_batch(spec, 2, 8)
  out, aux = models.build(spec).apply({"params": params}, batch, mutable=["intermediates"])
  two = models.build(looped()).apply({"params": params}, batch, iterations=2)
  np.testing.assert_array_equal(out, two)
  np.testing.assert_array_equal(aux["intermediates"]["decoder"]["depth"][0], 2.0)
  from xlps import train
  _, extras = train.apply_model(models.build(spec), params, batch)
  assert float(extras["depth"]) == 2.0
  train_out = models.build(spec).apply({"params": params}, batch, deterministic=False,
                                       rngs={"dropout": jax.random.PRNGKey(0)})
  np.testing.assert_array_equal(train_out, models.build(looped()).apply({"params": params},
                                                                        batch))


def test_adaptive_depth_accounting():
  """layer_flops is the FLOPs one more applied layer adds; a looped model's expected train
  FLOPs count the core at the sampler's mean iterations."""
  base = models.summarize(models.spec_of(tiny("decoder_lm", 7)), 8)["flops_per_token"]
  spec = looped(train_iterations="fixed", mean_iterations=2)
  summary = models.summarize(spec, 8)
  depth = summary["adaptive_depth"]
  per_layer = depth["layer_flops_per_token"]["decoder"]
  assert summary["flops_per_token"] - base == 2 * per_layer
  assert depth["expected_train_iterations"] == 2.0
  # Fixed at 2 of 3 iterations: the plain 2 + 2 x 2 + 1 = 7-layer model's FLOPs.
  assert depth["expected_train_flops_per_token"] == base == depth["eval_flops_per_token"]
  assert models.summarize(models.spec_of(tiny("decoder_lm", 4)))["adaptive_depth"] is None


@pytest.mark.slow
def test_launch_generate_runs_a_looped_model_beyond_its_trained_depth(tmp_path):
  """--iterations past the trained maximum deepens the scan (the parameters do not depend
  on the maximum) and the greedy continuation is the library's at that depth."""
  import sys
  from configs import default
  from tests.helpers import run_command
  from xlps import generate, interop
  from xlps.data.tokenizers import BOS, ByteTokenizer
  config = default.get_config("runlocal")
  config.model.num_layers = 9
  config.model.loop.update(**LOOP, inject="add")
  params = nn.unbox(models.init_params(models.spec_of(config)))
  interop.write_checkpoint(config, params, tmp_path / "w")
  out = run_command([sys.executable, "-m", "launch.generate", f"--workdir={tmp_path / 'w'}",
                     "--prompt=ab", "--max_new_tokens=6", "--iterations=5"])
  assert out.returncode == 0, out.stderr
  assert "5 of 5 core iterations" in out.stdout, out.stdout
  config.model.num_layers = 2 + 2 * 5 + 1
  config.model.loop.eval_iterations = 5
  tok = ByteTokenizer()
  want = generate.LMGenerator(models.spec_of(config), 6)(params, [[BOS, *tok.encode("ab")]])
  text = tok.decode(np.asarray(want.tokens[0, :int(want.lengths[0])])).decode("utf-8", "replace")
  assert f"--- prompt: 'ab'\nab{text}\n" in out.stdout


# ------------------------------------------------ truncated backprop against an unrolled loop


def _ln(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _reference_layer(x, lp, slot):
  """One pre-LN layer (MHA, exact-gelu FFN) of the tiny config, slot ``slot``, in plain jnp."""
  take = lambda tree: jax.tree.map(lambda a: a[slot], tree)  # noqa: E731
  a, m, n = take(lp["attention"]), take(lp["mlp"]), take(lp["norms"])
  h = _ln(x, n["attention"])
  proj = lambda q, name: jnp.einsum("bld,dhk->blhk", q, a[name]["kernel"]) + a[name]["bias"]  # noqa: E731
  q, k, v = proj(h, "query"), proj(h, "key"), proj(h, "value")
  logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
  length = x.shape[1]
  logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, -1e30)
  out = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(logits, -1), v)
  x = x + jnp.einsum("blhk,hkd->bld", out, a["out"]["kernel"]) + a["out"]["bias"]
  h = _ln(x, n["mlp"])
  h = jax.nn.gelu(h @ m["wi"]["kernel"] + m["wi"]["bias"], approximate=False)
  return x + h @ m["wo"]["kernel"] + m["wo"]["bias"]


def _reference_looped_logits(params, tokens, r, k, inject):
  """The looped LM (LOOP, ``init_state=prelude``) written as a Python loop over layers that
  detaches exactly the first max(r - k, 0) core iterations (Huginn's no-grad iterations)."""
  emb = params["embedder"]
  lp = params["decoder"]["layers"]
  x = emb["embedding"][tokens] + emb["position_embedding"][:tokens.shape[1]][None]
  for i in range(LOOP["prelude"]):
    x = _reference_layer(x, lp, i)
  e = x
  for it in range(r):
    if k and it == r - k and it > 0:
      x = jax.lax.stop_gradient(x)
    if inject == "add":
      x = x + e
    elif inject == "adapter":
      x = jnp.concatenate([x, e], -1) @ lp["adapter"]["kernel"] + lp["adapter"]["bias"]
    for j in range(LOOP["core"]):
      x = _reference_layer(x, lp, LOOP["prelude"] + j)
  for j in range(LOOP["coda"]):
    x = _reference_layer(x, lp, LOOP["prelude"] + LOOP["core"] + j)
  return _ln(x, params["final_norm"]) @ emb["embedding"].T


@pytest.mark.parametrize("inject", ["none", pytest.param("adapter", marks=pytest.mark.slow)])
def test_truncation_detaches_exactly_the_first_r_minus_k_iterations(inject):
  """k = 2 at r = 1, 2, 3 (r < k, r = k, r > k): every parameter's gradient equals the
  unrolled reference's, which detaches max(r - k, 0) iterations (none when r <= k: the
  prelude and embeddings keep their gradient)."""
  spec = looped(backprop_iterations=2, inject=inject)
  params = nn.unbox(models.init_params(spec))
  params = jax.tree.map(lambda p, key: p + 0.1 * jax.random.normal(key, p.shape),
                        params, jax.tree.unflatten(jax.tree.structure(params), list(
                            jax.random.split(jax.random.PRNGKey(3), len(jax.tree.leaves(params))))))
  batch = models.example_batch(spec, 2, 8)
  model = lambda p, r: models.build(spec).apply({"params": p}, batch, iterations=r)  # noqa: E731
  reference = lambda p, r: _reference_looped_logits(p, batch["inputs"], r, 2, inject)  # noqa: E731
  both = lambda f: jax.value_and_grad(lambda p, r: f(p, r).std())  # noqa: E731
  grad = jax.jit(lambda p, r: (model(p, r), both(model)(p, r)))
  ref = jax.jit(lambda p, r: (reference(p, r), both(reference)(p, r)), static_argnums=1)
  for r in (1, 2, 3):
    (got_logits, (_, got)), (want_logits, (_, want)) = grad(params, r), ref(params, r)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5)
    for path, a in jax.tree_util.tree_leaves_with_path(got):
      b = functools.reduce(lambda t, key: t[key.key], path, want)
      np.testing.assert_allclose(a, b, atol=1e-6, err_msg=f"r={r} {jax.tree_util.keystr(path)}")
    assert np.abs(np.asarray(got["embedder"]["embedding"])).sum() > 0


KV_POLICIES = {"per_layer": {}, "recursive": {"policy": "recursive"},
               "cla1": {"policy": "cross_layer", "group_size": 1},
               "cla2": {"policy": "cross_layer", "group_size": 2},
               "cla3": {"policy": "cross_layer", "group_size": 3},
               "table": {"policy": "table", "table": "0 1 2 2 3 3 4 4 5"}}


@pytest.mark.parametrize("prelude", [1, 2])
@pytest.mark.parametrize("kv", sorted(KV_POLICIES))
def test_loop_below_its_maximum_is_the_table_model_under_every_kv_policy(kv, prelude):
  """A loop run for r = 2 of 3 iterations equals the plain 2-iteration table model with the
  same K/V policy (masked iterations write nothing active layers read), or the K/V config
  is refused before any tracing, naming the field and what is valid."""
  layout = dict(LOOP, prelude=prelude)
  n = prelude + 2 * 3 + 1
  m = tiny("decoder_lm", n, kv_sharing=KV_POLICIES[kv])
  m.loop.update(layout)
  try:
    spec = models.spec_of(m)
  except config_lib.ConfigError as e:
    assert "model.kv_sharing." in str(e) and "valid" in str(e), str(e)
    assert kv in ("cla2", "cla3", "table"), f"{kv} refused: {e}"
    return
  slots = " ".join(map(str, list(range(prelude)) + [prelude, prelude + 1] * 2 + [prelude + 2]))
  plain = models.spec_of(tiny("decoder_lm", prelude + 2 * 2 + 1, kv_sharing=KV_POLICIES[kv],
                              sharing={"order": "table", "table": slots, "num_unique": 0}))
  params = nn.unbox(models.init_params(spec))
  params = jax.tree.map(lambda p: p * 4.0, params)  # logits far from uniform
  batch = models.example_batch(spec, 2, 8)
  got = models.build(spec).apply({"params": params}, batch, iterations=2)
  np.testing.assert_allclose(got, models.build(plain).apply({"params": params}, batch),
                             atol=1e-5)


@pytest.mark.parametrize("kv", ["per_layer", "recursive", "cla2"])
def test_random_initial_state_decodes_equal_to_recomputation(kv):
  """``init_state=random`` in deterministic passes depends on each token's position only:
  cached decoding of left-padded prompts (other rows, chunk lengths and offsets) gives the
  logits of one full forward pass per row, under every K/V policy a loop allows."""
  from tests.test_generate import NEW, PROMPTS, lm_reference, params_of
  from xlps import generate
  m = tiny("decoder_lm", 9, max_len=16, kv_sharing=KV_POLICIES[kv])
  m.loop.update(**LOOP, init_state="random", inject="add")
  spec = models.spec_of(m)
  params = params_of(spec)
  out = generate.LMGenerator(spec, NEW, generate.Sampling(temperature=1.0, seed=1), eos_id=-1,
                             return_logits=True)(params, PROMPTS)
  want = lm_reference(spec, params, PROMPTS, out.tokens)
  np.testing.assert_allclose(out.logits, want, atol=1e-5, rtol=1e-5)
