"""The scan engine equals the unrolled reference: outputs and gradients, every plan."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlps import config as config_lib
from xlps import models
from xlps.models import engine, layers

from helpers import tiny


def loss_and_grads(m, params, batch, dropout=False):
  module = models.build(m)

  def loss(p):
    rngs = {"dropout": jax.random.PRNGKey(7)} if dropout else None
    logits = module.apply({"params": p}, batch, deterministic=not dropout, rngs=rngs)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits

  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, logits, grads


def assert_scan_matches_unrolled(m, dropout=False):
  spec = models.spec_of(m)
  params = nn.unbox(models.init_params(spec, seed=1))
  batch = models.example_batch(spec, batch_size=2, length=8, seed=2)
  scan = loss_and_grads(m, params, batch, dropout)
  m_unrolled = m.copy_and_resolve_references()
  m_unrolled.scan_layers = False
  unrolled = loss_and_grads(m_unrolled, params, batch, dropout)
  np.testing.assert_allclose(scan[1], unrolled[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(scan[0], unrolled[0], rtol=1e-5, atol=1e-6)
  flat_s = jax.tree_util.tree_leaves_with_path(scan[2])
  flat_u = dict(jax.tree_util.tree_leaves_with_path(unrolled[2]))
  assert len(flat_s) == len(flat_u)
  for path, g in flat_s:
    np.testing.assert_allclose(g, flat_u[path], rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  # Every unique slot is used, so every gradient must be non-zero somewhere.
  for path, g in flat_s:
    assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)
  return params


# Compile-bound scan-vs-unrolled checks: one per kind in the fast tier, the rest slow.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("order,num_unique", [
    ("sequence", 3), pytest.param("cycle", 3, marks=SLOW), ("cycle_rev", 4),
    pytest.param("cycle", 1, marks=SLOW), pytest.param("sequence", 6, marks=SLOW),
])
def test_orders(order, num_unique):
  params = assert_scan_matches_unrolled(tiny(sharing={"order": order, "num_unique": num_unique}))
  kernel = params["decoder"]["layers"]["mlp"]["wi"]["kernel"]
  expected = (16, 32) if num_unique == 1 else (num_unique, 16, 32)
  assert kernel.shape == expected  # no stacked axis when fully tied


def test_explicit_table_sandwich():
  # Subformer's sandwich: first and last layer unique, middle shared; norms per layer.
  m = tiny(sharing={"order": "table", "table": "0 1 1 1 1 2", "num_unique": 0,
                    "norms": {"order": "sequence", "num_unique": 6}})
  params = assert_scan_matches_unrolled(m)
  layers = params["decoder"]["layers"]
  assert layers["attention"]["query"]["kernel"].shape[0] == 3
  assert layers["norms"]["attention"]["scale"].shape == (6, 16)


@pytest.mark.parametrize("shared", ["attention", pytest.param("mlp", marks=SLOW)])
def test_albert_ablation_per_component(shared):
  # Share one component across all layers, keep the other unshared.
  other = "mlp" if shared == "attention" else "attention"
  m = tiny(family="encoder_mlm", norm_position="post", embed_norm=True, embed_dim=8,
           type_vocab_size=2,
           sharing={"num_unique": 1, other: {"num_unique": 6, "order": "sequence"}})
  params = assert_scan_matches_unrolled(m)
  layers = params["encoder"]["layers"]
  unstacked_ndim = 3 if shared == "attention" else 2  # (heads, kv, embed) / (mlp, embed)
  assert layers[shared]["out" if shared == "attention" else "wo"]["kernel"].ndim == unstacked_ndim
  assert layers[other]["out" if other == "attention" else "wo"]["kernel"].shape[0] == 6


@pytest.mark.parametrize("tie", [pytest.param(False, marks=SLOW), True])
def test_encoder_decoder(tie):
  m = tiny(family="encoder_decoder", num_layers=4, num_decoder_layers=6,
           position_embedding="sinusoidal", tie_encoder_decoder=tie,
           sharing={"order": "cycle", "num_unique": 2, "cross_attention": {"num_unique": 3}})
  params = assert_scan_matches_unrolled(m)
  assert ("decoder" in params) != tie
  if tie:
    layers = params["encoder"]["layers"]
    assert layers["cross_attention"]["query"]["kernel"].shape[0] == 3
    assert set(layers) == {"attention", "mlp", "norms", "cross_attention", "decoder_norms"}


def test_dropout_and_gqa_and_remat():
  m = tiny(num_kv_heads=2, activation="swiglu", norm="rmsnorm", dropout_rate=0.1,
           attention_dropout_rate=0.1, remat_policy="dots_saveable",
           sharing={"order": "cycle_rev", "num_unique": 4})
  assert_scan_matches_unrolled(m, dropout=True)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_dropout_masks_per_layer_and_site(monkeypatch, scan_layers):
  # Applied layer i of a tied model draws its mask at each site s from
  # fold_in(fold_in(stack_key, i), s): layers and sites never share a mask.
  n, rate = 3, 0.5
  m = tiny(num_layers=n, dropout_rate=rate, attention_dropout_rate=rate,
           scan_layers=scan_layers, sharing={"num_unique": 1})
  spec = models.spec_of(m)
  params = nn.unbox(models.init_params(spec))
  stack_keys, drawn = [], []
  make_rng, dropout = nn.Module.make_rng, layers.dropout

  def record_stack_key(self, name):
    stack_keys.append(make_rng(self, name))
    return stack_keys[-1]

  def record_mask(x, p, key):
    keep = dropout(jnp.ones_like(x), p, key) != 0
    jax.debug.callback(lambda k: drawn.append(np.asarray(k)), keep, ordered=True)
    return dropout(x, p, key)

  monkeypatch.setattr(engine.Stack, "make_rng", record_stack_key)
  monkeypatch.setattr(layers, "dropout", record_mask)
  models.build(spec).apply({"params": params}, models.example_batch(spec, length=8),
                           deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
  jax.effects_barrier()
  (stack_key,) = stack_keys
  order = ("attention_probs", "attention", "mlp")  # the draws of one pre-LN layer
  assert len(drawn) == 1 + n * len(order)  # the embeddings' mask comes first
  for j, mask in enumerate(drawn[1:]):
    i, site = divmod(j, len(order))
    key = jax.random.fold_in(jax.random.fold_in(stack_key, i),
                             engine._DROPOUT_SITES[order[site]])
    np.testing.assert_array_equal(
        mask, jax.random.bernoulli(key, 1.0 - rate, mask.shape),
        err_msg=f"layer {i} site {order[site]}")
  residual = [mask for j, mask in enumerate(drawn[1:]) if j % len(order)]
  for a in range(len(residual)):
    for b in range(a):
      assert not np.array_equal(residual[a], residual[b]), (a, b)


@SLOW
def test_remat_policies_agree():
  base = tiny(sharing={"num_unique": 2})
  spec = models.spec_of(base)
  params = nn.unbox(models.init_params(spec))
  batch = models.example_batch(spec, length=8)  # within max_len: longer would be all NaN
  ref = loss_and_grads(base, params, batch)
  assert np.isfinite(ref[0])
  for policy in config_lib.REMAT_POLICIES[1:]:
    m = base.copy_and_resolve_references()
    m.remat_policy = policy
    out = loss_and_grads(m, params, batch)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out[2]), jax.tree.leaves(ref[2])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family, group, policy", [
    pytest.param("decoder_lm", 2, "none", marks=SLOW), ("decoder_lm", -1, "full"),
    pytest.param("encoder_mlm", 3, "dots_saveable", marks=SLOW),
    pytest.param("encoder_decoder", -1, "none", marks=SLOW)])
def test_two_level_remat_equals_one_level(family, group, policy):
  """Grouped (nested) scans run the same layers with the same dropout keys and slots."""
  base = tiny(family=family, dropout_rate=0.1, attention_dropout_rate=0.1,
              tie_encoder_decoder=family == "encoder_decoder", num_decoder_layers=4,
              sharing={"num_unique": 2, "order": "cycle_rev", "mlp": {"num_unique": 3}})
  spec = models.spec_of(base)
  params = nn.unbox(models.init_params(spec, seed=1))
  batch = models.example_batch(spec, batch_size=2, length=8, seed=2)
  ref = loss_and_grads(base, params, batch, dropout=True)
  nested = base.copy_and_resolve_references()
  nested.remat_group_size, nested.remat_policy = group, policy
  out = loss_and_grads(nested, params, batch, dropout=True)
  np.testing.assert_allclose(out[1], ref[1], rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(out[2]), jax.tree.leaves(ref[2])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size, n, k", [(0, 96, 0), (4, 96, 4), (-1, 96, 8), (-1, 6, 2),
                                        (-1, 24, 4), (-1, 7, 1), (-1, 16, 4)])
def test_remat_group_size(size, n, k):
  assert config_lib.remat_group_size(size, n) == k


def _train_temp_bytes(num_layers, num_unique=1, **model):
  """XLA temp bytes of value_and_grad of a small decoder LM (compile only)."""
  m = tiny(num_layers=num_layers, d_model=64, d_ff=128, max_len=64, num_heads=4,
           sharing={"num_unique": num_unique}, **model)
  spec = models.spec_of(m)
  params = jax.eval_shape(lambda: nn.unbox(models.init_params(spec)))
  batch = models.example_batch(spec, batch_size=4, length=64)
  module = models.build(spec)
  loss = lambda p: module.apply({"params": p}, batch).mean()  # noqa: E731
  compiled = jax.jit(jax.grad(loss)).lower(params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_two_level_remat_memory_is_flat_in_depth():
  """One-level full remat keeps every layer's input (grows with N); two-level keeps ~2 sqrt N."""
  flat = {n: _train_temp_bytes(n, remat_policy="full", remat_group_size=-1) for n in (6, 96)}
  one_level = {n: _train_temp_bytes(n, remat_policy="full") for n in (6, 96)}
  assert one_level[96] > 1.5 * one_level[6], one_level
  assert flat[96] <= 1.5 * flat[6], flat


def test_gathered_slot_parameters_are_not_saved_per_layer():
  """Without remat, M = 3 must not keep a copy of a layer's weights per applied layer."""
  n = 48
  layer_bytes = 4 * (4 * 64 * 64 + 2 * 64 * 128)  # attention and FFN kernels of one layer
  extra = _train_temp_bytes(n, num_unique=3) - _train_temp_bytes(n, num_unique=1)
  assert extra < 4 * layer_bytes, (extra, n * layer_bytes)


@pytest.mark.parametrize("family", ["decoder_lm", "encoder_mlm", "encoder_decoder"])
def test_every_param_has_logical_axes(family):
  m = tiny(family=family, num_layers=4, embed_dim=8, type_vocab_size=2, pooler=True,
           tie_embeddings=family != "decoder_lm",
           sharing={"num_unique": 2, "mlp": {"num_unique": 1}})
  boxed = models.init_params(m)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert len(leaf.names) == leaf.value.ndim
  stacked = [x.names for x in leaves if "unique" in x.names]
  assert stacked and all(names[0] == "unique" for names in stacked)
  stack = "decoder" if family == "decoder_lm" else "encoder"
  mlp = boxed[stack]["layers"]["mlp"]["wi"]["kernel"]
  assert mlp.names == ("embed", "mlp")  # the fully tied component has no unique axis
  assert boxed[stack]["layers"]["attention"]["query"]["kernel"].names == (
      "unique", "embed", "heads", "kv")


def test_init_is_truncated_normal():
  # Kernels and embeddings: N(0, init_std) truncated at +-2 init_std, as BERT / ALBERT's
  # tf.truncated_normal_initializer; the truncated values' std is ~0.88 init_std.
  std = 0.05
  m = tiny(family="encoder_mlm", vocab_size=4096, embed_dim=8, type_vocab_size=2, pooler=True,
           init_std=std, sharing={"num_unique": 2})
  flat = jax.tree_util.tree_leaves_with_path(nn.unbox(models.init_params(m)))
  drawn = [(jax.tree_util.keystr(p), np.asarray(w)) for p, w in flat
           if p[-1].key in ("kernel", "embedding", "position_embedding", "type_embedding")]
  assert len(drawn) > 10
  for path, w in drawn:
    peak = float(np.abs(w).max())
    assert peak <= 2 * std, f"{path}: max |w| = {peak}"
  values = np.concatenate([w.ravel() for _, w in drawn])
  phi = math.exp(-2.0) / math.sqrt(2 * math.pi)  # standard normal density at 2
  truncated_std = std * math.sqrt(1 - 4 * phi / math.erf(math.sqrt(2)))
  np.testing.assert_allclose(values.std(), truncated_std, rtol=0.02)
  assert abs(values.mean()) < 0.01 * std


@pytest.mark.parametrize("tie", [True, False])
def test_bfloat16_logits_in_float32(tie):
  # The output matmul runs in float32 on the bfloat16 hidden states: no bf16-rounded logits.
  m = tiny(dtype="bfloat16", tie_embeddings=tie)
  spec = models.spec_of(m)
  params = nn.unbox(models.init_params(spec))
  batch = models.example_batch(spec, length=8)
  logits, state = models.build(spec).apply({"params": params}, batch, mutable=["intermediates"])
  (hidden,) = state["intermediates"]["hidden_states"]
  assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  assert np.isfinite(logits).all()
  hidden = np.asarray(hidden, np.float64)
  if tie:
    expected = hidden @ np.asarray(params["embedder"]["embedding"], np.float64).T
  else:
    head = params["head"]["logits"]
    expected = hidden @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"])
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_sequence_longer_than_max_len_is_an_error():
  # Positions past the table would gather NaN (jnp.take's fill) and poison every output.
  spec = models.spec_of(tiny())
  params = models.init_params(spec)
  with pytest.raises(ValueError, match="sequence length 16 exceeds model.max_len=8"):
    models.build(spec).apply({"params": params}, models.example_batch(spec, length=16))
