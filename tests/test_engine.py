"""The scan engine equals the unrolled reference: outputs and gradients, every plan."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlps import config as config_lib
from xlps import models

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


@pytest.mark.parametrize("order,num_unique", [
    ("sequence", 3), ("cycle", 3), ("cycle_rev", 4), ("cycle", 1), ("sequence", 6),
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


@pytest.mark.parametrize("shared", ["attention", "mlp"])
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


@pytest.mark.parametrize("tie", [False, True])
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


def test_dropout_masks_differ_per_layer_and_site():
  # With dropout on, two forward passes with different keys differ; same key: identical.
  m = tiny(dropout_rate=0.5, sharing={"num_unique": 1})
  spec = models.spec_of(m)
  params = nn.unbox(models.init_params(spec))
  batch = models.example_batch(spec)
  module = models.build(spec)
  run = jax.jit(lambda k: module.apply({"params": params}, batch, deterministic=False,
                                       rngs={"dropout": jax.random.PRNGKey(k)}))
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.allclose(run(0), run(1))


def test_remat_policies_agree():
  base = tiny(sharing={"num_unique": 2})
  spec = models.spec_of(base)
  params = nn.unbox(models.init_params(spec))
  batch = models.example_batch(spec)
  ref = loss_and_grads(base, params, batch)
  for policy in config_lib.REMAT_POLICIES[1:]:
    m = base.copy_and_resolve_references()
    m.remat_policy = policy
    out = loss_and_grads(m, params, batch)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out[2]), jax.tree.leaves(ref[2])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


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
  stacked = [x.names for x in leaves if "layers" in x.names]
  assert stacked and all(names[0] == "layers" for names in stacked)
  stack = "decoder" if family == "decoder_lm" else "encoder"
  mlp = boxed[stack]["layers"]["mlp"]["wi"]["kernel"]
  assert mlp.names == ("embed", "mlp")  # the fully tied component has no layer axis
  assert boxed[stack]["layers"]["attention"]["query"]["kernel"].names == (
      "layers", "embed", "heads", "kv")
