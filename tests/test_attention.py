"""Attention kernels (``model.attention_impl``): ``jax.nn.dot_product_attention`` equals the
hand-written einsum path, dropout picks einsum, bad choices are ConfigErrors; bf16 compute
keeps float32 parameters, gradients and loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import configure, tiny
from xlps import config as config_lib
from xlps import models, train
from xlps.config import ConfigError
from xlps.models import layers

HEADS, HEAD_DIM, D_MODEL = 4, 8, 16
PAD_Q = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)  # 2nd row: 2 pad tokens
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 2, 2, 2, 0]], np.int32)  # 0 = padding
# Cross-attention keys: the 2nd example's keys are all padding (fully masked query rows).
PAD_K = np.array([[1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0]], bool)


def masks() -> dict[str, tuple[np.ndarray, int]]:
  """Name -> (boolean mask (batch, 1, q, k), key length): every mask the families build."""
  ones_q, ones_k = np.ones((2, 6), bool), np.ones((2, 7), bool)
  return {
      "causal_padded": (layers.make_attention_mask(PAD_Q, PAD_Q, causal=True), 6),
      "packed_segments": (layers.make_attention_mask(SEGMENTS != 0, SEGMENTS != 0, True,
                                                     SEGMENTS, SEGMENTS), 6),
      "bidirectional_padded_keys": (layers.make_attention_mask(ones_q, PAD_Q), 6),
      "cross_padded_keys": (layers.make_attention_mask(ones_q, PAD_K), 7),
      "cross_unmasked": (layers.make_attention_mask(ones_q, ones_k), 7),
  }


def attention(impl: str, kv_heads: int, dtype: str = "float32",
              dropout_rate: float = 0.0) -> layers.Attention:
  return layers.Attention(HEADS, kv_heads, HEAD_DIM, dropout_rate, impl, dtype=dtype)


def outputs_and_grads(impl, kv_heads, params, x, kv, mask, dropout_key=None):
  """Attention output and the gradients of a weighted sum of it w.r.t. params, x and kv."""
  module = attention(impl, kv_heads, dropout_rate=0.1 if dropout_key is not None else 0.0)
  weights = jax.random.normal(jax.random.PRNGKey(9), x.shape)

  def f(p, x, kv):
    out = module.apply({"params": p}, x, kv, mask, dropout_key=dropout_key)
    return (out * weights).sum(), out

  (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(params, x,
                                                                                     kv)
  return out, grads


def inputs(kv_heads: int, k_len: int):
  kx, kkv, kp = jax.random.split(jax.random.PRNGKey(kv_heads * 10 + k_len), 3)
  x = jax.random.normal(kx, (2, 6, D_MODEL))
  kv = jax.random.normal(kkv, (2, k_len, D_MODEL))
  params = nn.unbox(attention("einsum", kv_heads).init(kp, x, kv, jnp.ones((2, 1, 6, k_len),
                                                                           bool)))["params"]
  # Larger-than-init kernels so that the softmax is far from uniform.
  params = jax.tree.map(lambda p: p * 20.0, params)
  return params, x, kv


@pytest.mark.parametrize("impl", ["xla", "auto"])
@pytest.mark.parametrize("mask_name", sorted(masks()))
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_dot_product_attention_equals_einsum(impl, mask_name, kv_heads):
  """Outputs and gradients to 1e-5 in float32, fully masked rows (pads) included."""
  mask, k_len = masks()[mask_name]
  params, x, kv = inputs(kv_heads, k_len)
  ref_out, ref_grads = outputs_and_grads("einsum", kv_heads, params, x, kv, mask)
  out, grads = outputs_and_grads(impl, kv_heads, params, x, kv, mask)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_attend_uniformly():
  """A query with no valid key averages every value (finite, as with HF's large-negative
  mask), on both paths."""
  q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 1, 3, 2, HEAD_DIM))
  mask = jnp.array([[[[True, False, False], [False, False, False], [True, True, True]]]])
  for out in (layers.einsum_attention(q, k, v, mask),
              jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")):
    np.testing.assert_allclose(out[0, 1], v[0].mean(0), rtol=1e-6, atol=1e-6)


def test_auto_uses_einsum_only_while_probability_dropout_applies():
  mask, k_len = masks()["causal_padded"]
  params, x, kv = inputs(2, k_len)
  key = jax.random.PRNGKey(3)
  dropped_auto, _ = outputs_and_grads("auto", 2, params, x, kv, mask, dropout_key=key)
  dropped_einsum, _ = outputs_and_grads("einsum", 2, params, x, kv, mask, dropout_key=key)
  np.testing.assert_array_equal(dropped_auto, dropped_einsum)
  plain, _ = outputs_and_grads("einsum", 2, params, x, kv, mask)
  assert not np.allclose(dropped_auto, plain)  # the dropout did apply
  with pytest.raises(ValueError, match="no dropout on probabilities"):
    outputs_and_grads("xla", 2, params, x, kv, mask, dropout_key=key)


def test_auto_picks_xla_off_gpu():
  q = jnp.zeros((2, 8, HEADS, HEAD_DIM), jnp.bfloat16)
  assert jax.devices()[0].platform == "cpu" and not layers.cudnn_fits(q, q)


@pytest.mark.parametrize("overrides, message", [
    (dict(attention_impl="flash"), "model.attention_impl='flash' is not valid; choose one of: "
                                   "auto, xla, cudnn, einsum"),
    (dict(attention_impl="xla", attention_dropout_rate=0.1),
     "model.attention_impl='xla' has no dropout on attention probabilities but "
     "model.attention_dropout_rate=0.1; valid: attention_impl 'einsum' or 'auto'"),
    (dict(attention_impl="cudnn", attention_dropout_rate=0.1, dtype="bfloat16"),
     "model.attention_impl='cudnn' has no dropout"),
    (dict(attention_impl="cudnn"), "model.attention_impl='cudnn' needs model.dtype='bfloat16'"),
])
def test_bad_attention_impl_is_a_config_error(overrides, message):
  with pytest.raises(ConfigError) as error:
    models.spec_of(tiny(**overrides))
  assert str(error.value).startswith(message)


def test_valid_attention_impls():
  for impl in config_lib.ATTENTION_IMPLS:
    assert models.spec_of(tiny(attention_impl=impl, dtype="bfloat16")).attention_impl == impl
  for impl in ("auto", "einsum"):
    assert models.spec_of(tiny(attention_impl=impl, attention_dropout_rate=0.1))


def test_model_attention_impl_reaches_the_layers(monkeypatch):
  calls = {}
  real = jax.nn.dot_product_attention
  for impl in ("einsum", "xla"):
    calls[impl] = set()
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, impl=impl, **k: calls[impl].add(k["implementation"])
                        or real(*a, **k))
    spec = models.spec_of(tiny(attention_impl=impl, num_layers=2))
    batch = models.example_batch(spec, 2, 8)
    jax.eval_shape(lambda: models.build(spec).init(jax.random.PRNGKey(0), batch))
  assert calls == {"einsum": set(), "xla": {"xla"}}


# ---------------------------------------------------------------------------------- bf16


def loss_logits_grads(m, params, batch):
  module = models.build(m)

  def loss_fn(p):
    logits = module.apply({"params": p}, batch)
    return train.loss_and_metrics(logits, batch["targets"], batch["weights"])[0], logits

  (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return loss, logits, grads


@pytest.mark.parametrize("family", ["decoder_lm", "encoder_mlm"])
def test_bfloat16_compute_keeps_float32_params_grads_and_loss(family):
  """bf16 matmuls and attention, float32 master weights, gradients, loss and logits; the
  logits within bf16 rounding of the float32 model's."""
  m32 = configure(config_lib.model_config(), family=family, vocab_size=64, d_model=64,
                  num_heads=4, num_kv_heads=2, d_ff=128, num_layers=4, max_len=16)
  m16 = m32.copy_and_resolve_references()
  m16.dtype = "bfloat16"
  params = nn.unbox(models.init_params(m16, seed=1))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  spec = models.spec_of(m16)
  tokens = models.example_batch(spec, 4, 16, seed=2)["inputs"]
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
           "weights": jnp.ones(tokens.shape, jnp.float32)}
  loss16, logits16, grads16 = loss_logits_grads(m16, params, batch)
  loss32, logits32, grads32 = loss_logits_grads(m32, params, batch)
  assert loss16.dtype == logits16.dtype == jnp.float32
  assert {x.dtype for x in jax.tree.leaves(grads16)} == {jnp.dtype(jnp.float32)}
  scale = float(jnp.abs(logits32).max())
  np.testing.assert_allclose(logits16, logits32, atol=0.02 * scale)
  np.testing.assert_allclose(loss16, loss32, rtol=1e-3)
  flat16 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads16)])
  flat32 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads32)])
  cosine = flat16 @ flat32 / (jnp.linalg.norm(flat16) * jnp.linalg.norm(flat32))
  assert cosine > 0.999
