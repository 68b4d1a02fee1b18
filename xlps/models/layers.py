"""Slot-aware layers: every parameter is stacked over its group's M = ``num_unique`` slots.

A layer built with ``num_unique = M > 1`` owns parameters of shape ``(M, *shape)`` with the
logical axis ``"unique"`` in front, and each call gathers the slot it is told to use. With
``M == 1`` there is no stacked axis and no gather (the fully tied fast path). Every
parameter carries logical axis names for the sharding rules (``nn.with_logical_partitioning``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
UNIQUE_AXIS = "unique"


def slot_param(module: nn.Module, name: str, init_fn: Callable, shape: Sequence[int],
               axes: Sequence[str | None], num_unique: int, slot: Array | None) -> Array:
  """Creates (or reads) a parameter stacked over ``num_unique`` and returns ``slot``'s entry."""
  shape = tuple(shape)
  if num_unique == 1:
    return module.param(name, nn.with_logical_partitioning(init_fn, tuple(axes)), shape)

  def stacked_init(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, num_unique)
    return jax.vmap(lambda k: init_fn(k, shape, dtype))(keys)

  stacked = module.param(
      name, nn.with_logical_partitioning(stacked_init, (UNIQUE_AXIS, *axes)), shape)
  return jax.lax.dynamic_index_in_dim(stacked, slot, 0, keepdims=False)


class Projected(nn.Module, kw_only=True):
  """Keyword-only settings of a module made of ``Dense`` projections."""

  num_unique: int = 1          # M: slots the parameters are stacked over
  use_bias: bool = True
  init_std: float = 0.02
  dtype: str = "float32"       # compute dtype (parameters stay float32)

  def dense(self, name: str, features: tuple[int, ...], in_axes: tuple[str | None, ...],
            out_axes: tuple[str | None, ...]) -> "Dense":
    """A ``Dense`` submodule with this module's settings."""
    return Dense(features, in_axes, out_axes, num_unique=self.num_unique,
                 use_bias=self.use_bias, init_std=self.init_std, dtype=self.dtype, name=name)


class Dense(Projected):
  """Contracts the last ``len(in_axes)`` input dims into ``features`` (a DenseGeneral).

  The kernel starts as N(0, init_std) truncated at +-2 init_std, as BERT / ALBERT's
  ``tf.truncated_normal_initializer``: no rescaling, so its std is ~0.88 init_std.
  """

  features: tuple[int, ...]
  in_axes: tuple[str | None, ...]
  out_axes: tuple[str | None, ...]

  @nn.compact
  def __call__(self, x: Array, slot: Array | None = None) -> Array:
    n_in = len(self.in_axes)
    in_shape = x.shape[-n_in:]
    kernel = slot_param(self, "kernel", nn.initializers.truncated_normal(self.init_std),
                        (*in_shape, *self.features), (*self.in_axes, *self.out_axes),
                        self.num_unique, slot)
    dtype = jnp.dtype(self.dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())))
    if self.use_bias:
      bias = slot_param(self, "bias", nn.initializers.zeros, self.features, self.out_axes,
                        self.num_unique, slot)
      y = y + bias.astype(dtype)
    return y


class Norm(nn.Module):
  """LayerNorm (scale and bias) or RMSNorm (scale), computed in float32."""

  kind: str = "layernorm"
  eps: float = 1e-6
  num_unique: int = 1
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: Array, slot: Array | None = None) -> Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    features = (x.shape[-1],)
    if self.kind == "layernorm":
      mean = x.mean(-1, keepdims=True)
      var = jnp.square(x - mean).mean(-1, keepdims=True)
      y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    else:
      y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
    y = y * slot_param(self, "scale", nn.initializers.ones, features, (self.axis_name,),
                       self.num_unique, slot)
    if self.kind == "layernorm":
      y = y + slot_param(self, "bias", nn.initializers.zeros, features, (self.axis_name,),
                         self.num_unique, slot)
    return y.astype(dtype)


def activation_fn(name: str) -> Callable[[Array], Array]:
  """relu | gelu (exact erf, BERT) | gelu_tanh (ALBERT's gelu_new)."""
  return {
      "relu": jax.nn.relu,
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "swiglu": jax.nn.silu,
  }[name]


def dropout(x: Array, rate: float, key: Array | None) -> Array:
  """Inverted dropout with an explicit key; identity when ``key`` is None or rate is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
  """The Transformer's fixed sin/cos table, shape (length, dim); sin then cos halves."""
  half = dim // 2
  freq = np.exp(-np.log(10000.0) * np.arange(half) / max(half - 1, 1))
  angle = np.arange(length)[:, None] * freq[None, :]
  table = np.concatenate([np.sin(angle), np.cos(angle)], axis=-1)
  if dim % 2:
    table = np.pad(table, ((0, 0), (0, 1)))
  return table.astype(np.float32)


def make_attention_mask(q_valid: Array, k_valid: Array, causal: bool = False,
                        q_segments: Array | None = None,
                        k_segments: Array | None = None) -> Array:
  """Boolean mask (batch, 1, q_len, k_len): True where a query may attend to a key."""
  mask = q_valid[:, :, None] & k_valid[:, None, :]
  if causal:
    q_len, k_len = q_valid.shape[1], k_valid.shape[1]
    mask = mask & jnp.tril(jnp.ones((q_len, k_len), bool))[None]
  if q_segments is not None and k_segments is not None:
    mask = mask & (q_segments[:, :, None] == k_segments[:, None, :])
  return mask[:, None]


class Attention(Projected):
  """Scaled dot-product attention with grouped K/V heads (MHA, GQA, MQA) and cross-attention.

  ``num_kv_heads`` K/V heads are shared by groups of ``num_heads // num_kv_heads`` query
  heads. Softmax runs in float32; masked logits get the dtype's minimum (as HF does).
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, kv: Array, mask: Array, slot: Array | None = None,
               dropout_key: Array | None = None) -> Array:
    dense = self.dense
    q = dense("query", (self.num_heads, self.head_dim), ("embed",), ("heads", "kv"))(x, slot)
    k = dense("key", (self.num_kv_heads, self.head_dim), ("embed",), ("kv_heads", "kv"))(kv, slot)
    v = dense("value", (self.num_kv_heads, self.head_dim), ("embed",), ("kv_heads", "kv"))(kv,
                                                                                          slot)
    b, lq = q.shape[:2]
    groups = self.num_heads // self.num_kv_heads
    q = q.reshape(b, lq, self.num_kv_heads, groups, self.head_dim)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    logits = logits / np.sqrt(self.head_dim).astype(np.float32)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = dropout(probs, self.dropout_rate, dropout_key).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, lq, self.num_heads, self.head_dim)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    return dense("out", (x.shape[-1],), ("heads", "kv"), ("embed",))(out, slot)


class MLP(Projected):
  """Position-wise FFN: relu / gelu / gelu_tanh, or SwiGLU (silu(x W_gate) * x W_up)."""

  d_ff: int
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x: Array, slot: Array | None = None) -> Array:
    dense = self.dense
    h = activation_fn(self.activation)(dense("wi", (self.d_ff,), ("embed",), ("mlp",))(x, slot))
    if self.activation == "swiglu":
      h = h * dense("wi_up", (self.d_ff,), ("embed",), ("mlp",))(x, slot)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return dense("wo", (x.shape[-1],), ("mlp",), ("embed",))(h, slot)
