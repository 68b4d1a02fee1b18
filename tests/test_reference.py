"""The Flax models against an independent float64 NumPy reference written from the formulas.

Only the configs and the parameter tree come from xlps; every forward pass below (norms,
attention with grouped K/V heads and masks, FFNs, embeddings, heads, sharing slots) is
re-derived here. Every parameter gets random values (random kernels, non-zero biases,
non-unit norm scales, distinct slots) so that a mixed-up bias, scale or slot cannot hide
behind the zeros / ones of a fresh init; the model sees the float32 values, the reference
the same values upcast to float64.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlps import models

from helpers import tiny

ATOL = 1e-4
NEG = -1e30  # masked attention logits (a very large negative)


def random_params(spec, seed):
  """(float32 params for the model, the same values as float64 NumPy for the reference).

  The tree is xlps's own (``nn.unbox(models.init_params(spec))``, taken with
  ``jax.eval_shape``: no init compile); every leaf gets random values.
  """
  tree = jax.eval_shape(lambda: nn.unbox(models.init_params(spec, seed=seed)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    shape = leaf.shape
    if name == "scale":
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    elif name == "bias":
      value = 0.1 * rng.standard_normal(shape)
    elif name in ("embedding", "position_embedding", "type_embedding"):
      value = 0.5 * rng.standard_normal(shape)
    else:  # kernels: keep activations O(1) (fan-in 8..32)
      value = 0.25 * rng.standard_normal(shape)
    return value.astype(np.float32)

  p32 = jax.tree_util.tree_map_with_path(fill, tree)
  p64 = jax.tree.map(lambda x: x.astype(np.float64), p32)
  return jax.tree.map(jnp.asarray, p32), p64


def model_logits(m, params, batch, scan_layers):
  m = m.copy_and_resolve_references()
  m.scan_layers = scan_layers
  module = models.build(m)
  batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
  logits = jax.jit(lambda p, b: module.apply({"params": p}, b, deterministic=True))(params, batch)
  return np.asarray(logits, np.float64)


# ------------------------------------------------------------------ float64 reference


def slots(order, n, m):
  if order == "cycle":
    return [i % m for i in range(n)]
  assert order == "sequence" and n % m == 0
  return [i // (n // m) for i in range(n)]


def take(tree, m, i):
  """Slot ``i`` of a component's params: a leading axis of size M, none when M == 1."""
  if m == 1:
    return tree
  return jax.tree.map(lambda a: a[i], tree)


def layernorm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def rmsnorm(x, p, eps):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * p["scale"]


_erf = np.vectorize(math.erf)


def gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
  return x / (1.0 + np.exp(-x))


def softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def dense(x, p):
  return x @ p["kernel"] + p["bias"]


def attention(x, kv, mask, p, num_heads, num_kv_heads):
  """x (B, Lq, D), kv (B, Lk, D), mask (B, Lq, Lk) bool: True = may attend."""
  head_dim = p["query"]["kernel"].shape[-1]
  q = np.einsum("bld,dhk->blhk", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bld,dhk->blhk", kv, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("bld,dhk->blhk", kv, p["value"]["kernel"]) + p["value"]["bias"]
  assert k.shape[2] == num_kv_heads and q.shape[2] == num_heads
  group = num_heads // num_kv_heads
  heads = []
  for h in range(num_heads):
    kh, vh = k[:, :, h // group], v[:, :, h // group]
    logits = np.einsum("bqd,bsd->bqs", q[:, :, h], kh) / math.sqrt(head_dim)
    logits = np.where(mask, logits, NEG)
    heads.append(np.einsum("bqs,bsd->bqd", softmax(logits), vh))
  out = np.stack(heads, axis=2)  # (B, Lq, heads, head_dim)
  return np.einsum("blhk,hkd->bld", out, p["out"]["kernel"]) + p["out"]["bias"]


def mlp(x, p, activation):
  if activation == "swiglu":
    h = silu(dense(x, p["wi"])) * dense(x, p["wi_up"])
  else:
    h = {"gelu": gelu, "gelu_tanh": gelu_tanh, "relu": lambda a: np.maximum(a, 0)}[
        activation](dense(x, p["wi"]))
  return dense(h, p["wo"])


def residual(x, fn, norm_p, norm, pre):
  return x + fn(norm(x, norm_p)) if pre else norm(x + fn(x), norm_p)


def causal(length):
  return np.tril(np.ones((length, length), bool))[None]


def sinusoidal(length, dim):
  half = dim // 2
  freq = np.exp(-math.log(10000.0) * np.arange(half) / max(half - 1, 1))
  angle = np.arange(length)[:, None] * freq[None, :]
  return np.concatenate([np.sin(angle), np.cos(angle)], axis=-1)


# ------------------------------------------------------------------ decoder_lm


DEC_N, DEC_M_ATTN, DEC_M_MLP = 6, 2, 3


def decoder_lm_config():
  return tiny("decoder_lm", DEC_N, num_kv_heads=2, activation="gelu", norm="layernorm",
              norm_position="pre", position_embedding="learned", tie_embeddings=True,
              sharing={"num_unique": DEC_M_ATTN, "order": "cycle",
                       "mlp": {"num_unique": DEC_M_MLP, "order": "sequence"}})


def decoder_lm_reference(p, tokens, segment_ids, eps):
  b, length = tokens.shape
  emb = p["embedder"]
  x = emb["embedding"][tokens] + emb["position_embedding"][np.arange(length)][None]
  if segment_ids is None:
    mask = np.broadcast_to(causal(length), (b, length, length))
  else:
    valid = segment_ids != 0
    mask = (causal(length) & valid[:, :, None] & valid[:, None, :]
            & (segment_ids[:, :, None] == segment_ids[:, None, :]))
  lp = p["decoder"]["layers"]
  norm = lambda h, q: layernorm(h, q, eps)  # noqa: E731
  attn_slots = slots("cycle", DEC_N, DEC_M_ATTN)
  mlp_slots = slots("sequence", DEC_N, DEC_M_MLP)
  assert mlp_slots == [0, 0, 1, 1, 2, 2]
  for i in range(DEC_N):
    ap = take(lp["attention"], DEC_M_ATTN, attn_slots[i])
    np_ = take(lp["norms"], DEC_M_ATTN, attn_slots[i])  # norms follow the default plan
    mp = take(lp["mlp"], DEC_M_MLP, mlp_slots[i])
    x = residual(x, lambda h: attention(h, h, mask, ap, 4, 2), np_["attention"], norm, True)
    x = residual(x, lambda h: mlp(h, mp, "gelu"), np_["mlp"], norm, True)
  x = layernorm(x, p["final_norm"], eps)
  return x @ emb["embedding"].T


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_decoder_lm_gqa_mixed_sharing(packed, scan_layers):
  m = decoder_lm_config()
  spec = models.spec_of(m)
  params, p64 = random_params(spec, seed=3)
  lp = p64["decoder"]["layers"]
  assert lp["attention"]["key"]["kernel"].shape == (DEC_M_ATTN, 16, 2, 4)
  assert lp["attention"]["query"]["kernel"].shape == (DEC_M_ATTN, 16, 4, 4)
  assert lp["mlp"]["wi"]["kernel"].shape == (DEC_M_MLP, 16, 32)
  assert lp["norms"]["mlp"]["scale"].shape == (DEC_M_ATTN, 16)

  rng = np.random.default_rng(11)
  tokens = rng.integers(1, 32, (2, 8))
  batch = {"inputs": tokens}
  segment_ids = None
  if packed:
    # Row 0: two packed sequences then padding; row 1: padding first, then two sequences.
    segment_ids = np.array([[1, 1, 1, 2, 2, 2, 2, 0],
                            [0, 0, 1, 1, 1, 2, 2, 2]])
    batch["segment_ids"] = segment_ids
  got = model_logits(m, params, batch, scan_layers)
  want = decoder_lm_reference(p64, tokens, segment_ids, spec.norm_eps)
  assert got.shape == want.shape == (2, 8, 32)
  # Padding queries attend to nothing (a fully masked row); their outputs are don't-care.
  keep = np.ones((2, 8), bool) if segment_ids is None else segment_ids != 0
  np.testing.assert_allclose(got[keep], want[keep], rtol=0, atol=ATOL)

  if packed:
    # Packing isolates the segments: segment 2 of row 0 equals that sequence run alone
    # (the model keeps the absolute positions 3..6, so compare against the reference).
    alone = decoder_lm_reference(p64, tokens[:1], np.array([[0, 0, 0, 2, 2, 2, 2, 0]]),
                                 spec.norm_eps)
    np.testing.assert_allclose(got[0, 3:7], alone[0, 3:7], rtol=0, atol=ATOL)


# ------------------------------------------------------------------ encoder_mlm (ALBERT)


ENC_N = 3


def albert_config():
  return tiny("encoder_mlm", ENC_N, embed_dim=8, embed_norm=True, norm_position="post",
              norm="layernorm", type_vocab_size=2, activation="gelu_tanh", norm_eps=1e-12,
              position_embedding="learned", tie_embeddings=True, sharing={"num_unique": 1})


def albert_reference(p, input_ids, attention_mask, token_type_ids, eps):
  b, length = input_ids.shape
  emb = p["embedder"]
  x = (emb["embedding"][input_ids] + emb["position_embedding"][np.arange(length)][None]
       + emb["type_embedding"][token_type_ids])
  x = layernorm(x, emb["norm"], eps)
  x = dense(x, emb["projection"])  # E -> H
  # Padding is masked as keys only (BERT / ALBERT): every query sees the valid keys.
  mask = np.broadcast_to(attention_mask.astype(bool)[:, None, :], (b, length, length))
  lp = p["encoder"]["layers"]  # fully tied: no stacked axis
  norm = lambda h, q: layernorm(h, q, eps)  # noqa: E731
  for _ in range(ENC_N):
    x = residual(x, lambda h: attention(h, h, mask, lp["attention"], 4, 4),
                 lp["norms"]["attention"], norm, False)
    x = residual(x, lambda h: mlp(h, lp["mlp"], "gelu_tanh"), lp["norms"]["mlp"], norm, False)
  head = p["head"]
  h = layernorm(gelu_tanh(dense(x, head["transform"])), head["transform_norm"], eps)
  return h @ emb["embedding"].T + head["bias"]


@functools.lru_cache(maxsize=None)
def _albert_case(scan_layers):
  m = albert_config()
  spec = models.spec_of(m)
  params, p64 = random_params(spec, seed=5)
  lp = p64["encoder"]["layers"]
  assert lp["attention"]["query"]["kernel"].shape == (16, 4, 4)
  assert lp["mlp"]["wi"]["kernel"].shape == (16, 32)
  assert p64["embedder"]["projection"]["kernel"].shape == (8, 16)
  assert p64["head"]["transform"]["kernel"].shape == (16, 8)

  rng = np.random.default_rng(13)
  input_ids = rng.integers(1, 32, (2, 8))
  attention_mask = np.array([[1, 1, 1, 1, 1, 1, 1, 1],
                             [1, 1, 1, 1, 1, 0, 0, 0]])
  token_type_ids = np.array([[0, 0, 0, 0, 1, 1, 1, 1],
                             [0, 0, 1, 1, 1, 0, 0, 0]])
  batch = {"inputs": input_ids, "input_mask": attention_mask, "token_types": token_type_ids}
  got = model_logits(m, params, batch, scan_layers)
  want = albert_reference(p64, input_ids, attention_mask, token_type_ids, spec.norm_eps)
  assert got.shape == want.shape == (2, 8, 32)
  return got, want, attention_mask.astype(bool)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_albert_shape_encoder_mlm(scan_layers):
  got, want, valid = _albert_case(scan_layers)
  np.testing.assert_allclose(got[valid], want[valid], rtol=0, atol=ATOL)


def test_albert_padding_positions_attend_to_valid_keys():
  # BERT / ALBERT mask padding as keys only, so logits at padding positions are defined
  # (and match Hugging Face checkpoints at every position).
  got, want, valid = _albert_case(True)
  np.testing.assert_allclose(got[~valid], want[~valid], rtol=0, atol=ATOL)


# ------------------------------------------------------------------ encoder_decoder (tied)


ED_ENC_N, ED_DEC_N = 2, 3


def tied_encdec_config():
  return tiny("encoder_decoder", ED_ENC_N, num_decoder_layers=ED_DEC_N, tie_encoder_decoder=True,
              norm="rmsnorm", norm_position="pre", activation="swiglu",
              position_embedding="sinusoidal", scale_embeddings=True, tie_embeddings=True,
              sharing={"num_unique": 1})


def tied_encdec_reference(p, inputs, targets, eps, max_len):
  b, ls = inputs.shape
  lt = targets.shape[1]
  emb = p["embedder"]
  table = sinusoidal(max_len, emb["embedding"].shape[1])
  scale = math.sqrt(emb["embedding"].shape[1])  # scale_embeddings (Vaswani et al. 3.4)
  lp = p["encoder"]["layers"]
  norm = lambda h, q: rmsnorm(h, q, eps)  # noqa: E731
  src_valid = inputs != 0

  x = scale * emb["embedding"][inputs] + table[np.arange(ls)][None]
  enc_mask = src_valid[:, :, None] & src_valid[:, None, :]
  for _ in range(ED_ENC_N):
    x = residual(x, lambda h: attention(h, h, enc_mask, lp["attention"], 4, 4),
                 lp["norms"]["attention"], norm, True)
    x = residual(x, lambda h: mlp(h, lp["mlp"], "swiglu"), lp["norms"]["mlp"], norm, True)
  encoded = rmsnorm(x, p["encoder_norm"], eps)

  dec_in = np.concatenate([np.zeros((b, 1), targets.dtype), targets[:, :-1]], axis=1)
  y = scale * emb["embedding"][dec_in] + table[np.arange(lt)][None]
  self_mask = np.broadcast_to(causal(lt), (b, lt, lt))
  cross_mask = np.broadcast_to(src_valid[:, None, :], (b, lt, ls))
  dn = lp["decoder_norms"]
  for _ in range(ED_DEC_N):
    y = residual(y, lambda h: attention(h, h, self_mask, lp["attention"], 4, 4),
                 dn["attention"], norm, True)
    y = residual(y, lambda h: attention(h, encoded, cross_mask, lp["cross_attention"], 4, 4),
                 dn["cross_attention"], norm, True)
    y = residual(y, lambda h: mlp(h, lp["mlp"], "swiglu"), dn["mlp"], norm, True)
  y = rmsnorm(y, p["decoder_norm"], eps)
  return y @ emb["embedding"].T


@pytest.mark.parametrize("scan_layers", [True, False])
def test_tied_encoder_decoder(scan_layers):
  m = tied_encdec_config()
  spec = models.spec_of(m)
  params, p64 = random_params(spec, seed=7)
  assert "decoder" not in p64
  assert set(p64["encoder"]["layers"]) == {"attention", "mlp", "norms", "cross_attention",
                                           "decoder_norms"}
  assert "bias" not in p64["encoder_norm"]  # rmsnorm: scale only

  rng = np.random.default_rng(17)
  inputs = rng.integers(1, 32, (2, 8))
  inputs[0, 5:] = 0  # trailing source padding
  inputs[1, 2] = 0   # a padding token inside the source
  targets = rng.integers(1, 32, (2, 8))
  batch = {"inputs": inputs, "targets": targets}
  got = model_logits(m, params, batch, scan_layers)
  want = tied_encdec_reference(p64, inputs, targets, spec.norm_eps, spec.max_len)
  assert got.shape == want.shape == (2, 8, 32)
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
