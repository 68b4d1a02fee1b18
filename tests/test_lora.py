"""Per-applied-layer LoRA on shared slots: tying when off or fresh, the reconstruction
reference (an unshared model holding each layer's effective weights), accounting, sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from xlps import config as config_lib
from xlps import models, partitioning, train

from helpers import tiny

N, M, R = 4, 2, 3


def lora_model(rank=R, bias=True, **overrides):
  m = tiny("decoder_lm", N, sharing={"num_unique": M, "order": "cycle"}, **overrides)
  m.lora.rank, m.lora.bias = rank, bias
  return m


def random_params(spec, seed=0, scale=0.05):
  """Every leaf random (B and bias offsets non-zero), so each layer's adapter matters."""
  params = nn.unbox(models.init_params(spec, seed))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def apply(model_cfg, params, batch):
  return models.build(model_cfg).apply({"params": params}, batch)


def test_rank_zero_is_plain_tying_bitwise():
  plain = tiny("decoder_lm", N, sharing={"num_unique": M, "order": "cycle"})
  off = lora_model(rank=0, bias=True)  # targets / bias are ignored at rank 0
  off.lora.targets = "query,wo"
  spec = models.spec_of(plain)
  assert models.spec_of(off).lora is None
  params = random_params(spec)
  assert models.param_shapes(off) == models.param_shapes(plain)
  batch = models.example_batch(spec, 2, 8)
  np.testing.assert_array_equal(apply(off, params, batch), apply(plain, params, batch))


@pytest.mark.parametrize("scan", [True, False])
def test_fresh_adapters_leave_the_tied_model_bitwise(scan):
  """B and the offsets start at zero: x A B adds exact zeros to each projection."""
  plain = tiny("decoder_lm", N, sharing={"num_unique": M, "order": "cycle"}, scan_layers=scan)
  lora = lora_model(scan_layers=scan)
  base = random_params(models.spec_of(plain))
  fresh = nn.unbox(models.init_params(models.spec_of(lora), 3))
  params = {**base, "decoder": {"layers": _merge(base["decoder"]["layers"],
                                                 fresh["decoder"]["layers"])}}
  batch = models.example_batch(models.spec_of(plain), 2, 8)
  np.testing.assert_array_equal(apply(lora, params, batch), apply(plain, base, batch))


def _merge(base, fresh):
  """``base`` plus the ``lora_*`` leaves of ``fresh``."""
  out = dict(base)
  for key, value in fresh.items():
    if isinstance(value, dict):
      out[key] = _merge(base.get(key, {}), value)
    elif key.startswith("lora"):
      out[key] = value
  return out


def effective_unshared(params, spec):
  """Each applied layer's weights as an unshared model (M = N, sequence): slot + A_i B_i,
  bias + offset_i; the independent reference for the per-layer gather."""
  slots = spec.stacks[0].plans["attention"].slots

  def layer(tree, i):
    out = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        out[key] = layer(value, i)
      elif not key.startswith("lora"):
        out[key] = np.asarray(value[slots[i]], np.float64)
    if "lora_a" in tree:
      a, b = np.asarray(tree["lora_a"][i], np.float64), np.asarray(tree["lora_b"][i], np.float64)
      r = a.shape[-1]
      delta = a.reshape(-1, r) @ b.reshape(r, -1)
      out["kernel"] = out["kernel"] + delta.reshape(out["kernel"].shape)
      if "lora_bias" in tree:
        out["bias"] = out["bias"] + np.asarray(tree["lora_bias"][i], np.float64)
    return out

  layers = [layer(params["decoder"]["layers"], i) for i in range(N)]
  stacked = jax.tree.map(lambda *xs: np.stack(xs).astype(np.float32), *layers)
  return {**params, "decoder": {"layers": stacked}}


@pytest.mark.parametrize("targets,bias", [
    pytest.param("query,key,value,out,wi,wo", True, marks=pytest.mark.slow), ("value,wo", False)])
def test_each_applied_layer_uses_its_own_adapter(targets, bias):
  lora = lora_model(bias=bias)
  lora.lora.targets = targets
  spec = models.spec_of(lora)
  params = random_params(spec)
  unshared = tiny("decoder_lm", N, sharing={"num_unique": N, "order": "sequence"})
  batch = models.example_batch(spec, 2, 8)
  expect = apply(unshared, effective_unshared(params, spec), batch)
  np.testing.assert_allclose(apply(lora, params, batch), expect, atol=1e-5, rtol=1e-5)
  unrolled = lora_model(bias=bias, scan_layers=False)
  unrolled.lora.targets = targets
  np.testing.assert_allclose(apply(unrolled, params, batch), expect, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_layers_adapter():
  lora = lora_model()
  spec = models.spec_of(lora)
  fresh = nn.unbox(models.init_params(spec, 0))
  batch = models.example_batch(spec, 2, 8)

  def loss(params):
    return jnp.mean(apply(lora, params, batch) ** 2)

  grads = jax.grad(loss)(fresh)["decoder"]["layers"]
  for path in (("attention", "query"), ("mlp", "wo")):
    node = grads[path[0]][path[1]]
    # B = 0 at init: A gets no gradient yet, B and the offset do, in every applied layer.
    assert np.all(np.asarray(node["lora_a"]) == 0)
    for leaf in ("lora_b", "lora_bias"):
      per_layer = np.abs(np.asarray(node[leaf])).reshape(N, -1).max(-1)
      assert np.all(per_layer > 0), (path, leaf, per_layer)


def test_accounting_counts_each_adapter_once():
  lora, plain = lora_model(), tiny("decoder_lm", N, sharing={"num_unique": M, "order": "cycle"})
  with_lora, without = models.summarize(lora), models.summarize(plain)
  d, f, r = 16, 32, R
  # query/key/value/out: A (N, d, r) + B (N, r, d) + offset (N, d); wi: d->f, wo: f->d.
  attention = 4 * N * (d * r + r * d + d)
  mlp = N * (d * r + r * f + f) + N * (f * r + r * d + d)
  assert with_lora["unique_params"] - without["unique_params"] == attention + mlp
  assert with_lora["applied_params"] - without["applied_params"] == attention + mlp
  matmul = 4 * N * 2 * d * r + N * (d * r + r * f) + N * (f * r + r * d)
  assert with_lora["flops_per_token"] - without["flops_per_token"] == 6 * matmul


def test_adapters_are_sharded_like_their_kernels():
  lora = lora_model(num_kv_heads=2)
  spec = models.spec_of(lora)
  cfg = config_lib.mesh_config()
  cfg.fsdp, cfg.tensor, cfg.data = 4, 2, 1
  mesh = partitioning.make_mesh(cfg)
  boxed = models.init_params(spec)
  specs = partitioning.logical_shardings(boxed, mesh, partitioning.rules_of(cfg))
  layers = specs["decoder"]["layers"]
  assert layers["attention"]["query"]["lora_a"].spec == P(None, "fsdp", None)
  assert layers["attention"]["query"]["lora_b"].spec == P(None, None, "tensor", None)
  assert layers["attention"]["out"]["lora_a"].spec == P(None, "tensor", None, None)
  assert layers["mlp"]["wi"]["lora_b"].spec == P(None, None, "tensor")
  assert layers["mlp"]["wo"]["lora_bias"].spec == P(None, "fsdp")


def test_weight_decay_rules_cover_the_adapters():
  spec = models.spec_of(lora_model())
  mask = train.decay_mask(nn.unbox(models.init_params(spec)))["decoder"]["layers"]["mlp"]["wi"]
  assert mask["lora_a"] and mask["lora_b"] and not mask["lora_bias"]


@pytest.mark.parametrize("key,value,match", [
    ("targets", "query,ffn", "model.lora.targets='ffn' is not valid"),
    ("targets", "", "empty model.lora.targets"),
    ("rank", -1, "model.lora.rank=-1"),
])
def test_bad_lora_config_names_the_field(key, value, match):
  m = lora_model()
  m.lora[key] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    models.spec_of(m)


def test_lora_refuses_tied_encoder_decoder():
  m = tiny("encoder_decoder", 2, tie_encoder_decoder=True)
  m.lora.rank = 2
  with pytest.raises(config_lib.ConfigError, match="tie_encoder_decoder"):
    models.spec_of(m)


def test_cached_decoding_with_adapters_equals_recomputation():
  from xlps.models import transformer
  lora = lora_model(num_kv_heads=2)
  spec = models.spec_of(lora)
  params = random_params(spec)
  tokens = jnp.asarray(models.example_batch(spec, 2, 8)["inputs"])
  module = models.build(spec)
  full = module.apply({"params": params}, {"inputs": tokens})
  apply = jax.jit(lambda chunk, cache: module.apply({"params": params}, {"inputs": chunk},
                                                    cache=cache))
  logits, cache = apply(tokens[:, :5], transformer.init_cache(spec, 2, 8))
  steps = [logits]
  for t in range(5, 8):
    logits, cache = apply(tokens[:, t:t + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)
