"""Slot-aware layers: every parameter is stacked over its group's M = ``num_unique`` slots.

A layer built with ``num_unique = M > 1`` owns parameters of shape ``(M, *shape)`` with the
logical axis ``"unique"`` in front, and each call gathers the slot it is told to use. With
``M == 1`` there is no stacked axis and no gather (the fully tied fast path). Every
parameter carries logical axis names for the sharding rules (``nn.with_logical_partitioning``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
UNIQUE_AXIS = "unique"


def slot_param(module: nn.Module, name: str, init_fn: Callable, shape: Sequence[int],
               axes: Sequence[str | None], num_unique: int, slot: Array | None) -> Array:
  """Creates (or reads) a parameter stacked over ``num_unique`` and returns ``slot``'s entry
  (the whole ``(M, *shape)`` stack when ``slot`` is None)."""
  shape = tuple(shape)
  if num_unique == 1:
    return module.param(name, nn.with_logical_partitioning(init_fn, tuple(axes)), shape)

  def stacked_init(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, num_unique)
    return jax.vmap(lambda k: init_fn(k, shape, dtype))(keys)

  stacked = module.param(
      name, nn.with_logical_partitioning(stacked_init, (UNIQUE_AXIS, *axes)), shape)
  return stacked if slot is None else take_slot(stacked, slot)


def take_slot(stacked: Array, slot: Array) -> Array:
  """Entry ``slot`` of a parameter stacked over its slots (one dynamic slice)."""
  return jax.lax.dynamic_index_in_dim(stacked, slot, 0, keepdims=False)


class Projected(nn.Module, kw_only=True):
  """Keyword-only settings of a module made of ``Dense`` projections."""

  num_unique: int = 1          # M: slots the parameters are stacked over
  use_bias: bool = True
  init_std: float = 0.02
  dtype: str = "float32"       # compute dtype (parameters stay float32)
  lora: Any = None             # config.LoraSpec: adapters on the projections it targets
  depth: int = 0               # N: applied layers the adapters are stacked over

  def dense(self, name: str, features: tuple[int, ...], in_axes: tuple[str | None, ...],
            out_axes: tuple[str | None, ...]) -> "Dense":
    """A ``Dense`` submodule with this module's settings (and an adapter if LoRA targets it)."""
    adapted = self.lora is not None and name in self.lora.targets
    return Dense(features, in_axes, out_axes, num_unique=self.num_unique,
                 use_bias=self.use_bias, init_std=self.init_std, dtype=self.dtype,
                 lora_rank=self.lora.rank if adapted else 0,
                 lora_bias=adapted and self.lora.bias, depth=self.depth, name=name)


class Dense(Projected):
  """Contracts the last ``len(in_axes)`` input dims into ``features`` (a DenseGeneral).

  The kernel starts as N(0, init_std) truncated at +-2 init_std, as BERT / ALBERT's
  ``tf.truncated_normal_initializer``: no rescaling, so its std is ~0.88 init_std.
  With M > 1 the slot gather and the matmul are rematerialised together, so the backward
  pass gathers the slot again (one dynamic slice) instead of saving a copy of its weights
  per applied layer (N copies of a layer's parameters, whatever ``remat_policy`` says).

  With ``lora_rank = r > 0`` applied layer ``layer`` also adds ``(x A[layer]) B[layer]``
  (and, with ``lora_bias``, ``bias_offset[layer]``): ``lora_a`` ``(N, *in, r)``, ``lora_b``
  ``(N, r, *features)``, stacked along the ``depth`` = N applied layers (logical axis
  ``depth``) and sharded like the kernel. A starts N(0, init_std), B and the offset at
  zero, so a fresh adapter leaves the shared layer exactly as it is.
  """

  features: tuple[int, ...]
  in_axes: tuple[str | None, ...]
  out_axes: tuple[str | None, ...]
  lora_rank: int = 0
  lora_bias: bool = False

  @nn.compact
  def __call__(self, x: Array, slot: Array | None = None, layer: Array | None = None) -> Array:
    n_in = len(self.in_axes)
    in_shape = x.shape[-n_in:]
    kernel = slot_param(self, "kernel", nn.initializers.truncated_normal(self.init_std),
                        (*in_shape, *self.features), (*self.in_axes, *self.out_axes),
                        self.num_unique, None)
    bias = (slot_param(self, "bias", nn.initializers.zeros, self.features, self.out_axes,
                       self.num_unique, None) if self.use_bias else None)
    dtype = jnp.dtype(self.dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    stacked = self.num_unique > 1

    def project(x, kernel, bias):
      kernel = take_slot(kernel, slot) if stacked else kernel
      y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())))
      if bias is None:
        return y
      return y + (take_slot(bias, slot) if stacked else bias).astype(dtype)

    if stacked:
      project = jax.checkpoint(project, prevent_cse=False)
    y = project(x, kernel, bias)
    if self.lora_rank:
      y = y + self._adapter(x, in_shape, contract, layer)
    return y

  def _adapter(self, x: Array, in_shape: tuple[int, ...], contract, layer: Array) -> Array:
    """Applied layer ``layer``'s low-rank update of this projection."""
    if layer is None:
      raise ValueError(f"{self.name}: a LoRA projection needs the applied-layer index")
    r, n, dtype = self.lora_rank, self.depth, jnp.dtype(self.dtype)
    depth_param = lambda name, init, shape, axes: self.param(  # noqa: E731
        name, nn.with_logical_partitioning(init, ("depth", *axes)), (n, *shape))
    a = depth_param("lora_a", nn.initializers.normal(self.init_std), (*in_shape, r),
                    (*self.in_axes, None))
    b = depth_param("lora_b", nn.initializers.zeros, (r, *self.features), (None, *self.out_axes))
    a, b = take_slot(a, layer).astype(dtype), take_slot(b, layer).astype(dtype)
    h = jax.lax.dot_general(x.astype(dtype), a, (contract, ((), ())))
    update = jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())))
    if self.lora_bias:
      offset = depth_param("lora_bias", nn.initializers.zeros, self.features, self.out_axes)
      update = update + take_slot(offset, layer).astype(dtype)
    return update


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


def sinusoid(values: Array, dim: int) -> Array:
  """``sinusoidal_positions`` of traced values (positions, or the step count of ACT's
  coordinates): shape ``values.shape + (dim,)``, float32."""
  half = dim // 2
  freq = jnp.exp(-np.log(10000.0) * jnp.arange(half) / max(half - 1, 1))
  angle = jnp.asarray(values, jnp.float32)[..., None] * freq
  table = jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)
  return jnp.pad(table, [(0, 0)] * (table.ndim - 1) + [(0, dim % 2)])


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


def make_decode_mask(valid: Array, index: Array | int, length: int) -> Array:
  """Mask (batch, 1, length, T) of ``length`` queries at cache positions ``index ..`` over a
  cache of T positions: a query sees the valid keys at or before its own position."""
  query = index + jnp.arange(length)
  causal = jnp.arange(valid.shape[1])[None, :] <= query[:, None]
  return (valid[:, None, :] & causal[None])[:, None]


def cudnn_fits(query: Array, key: Array) -> bool:
  """Whether cuDNN flash attention takes these inputs (``attention_impl="auto"`` asks).

  An NVIDIA GPU, bf16 / fp16 inputs, a head size that is a multiple of 8 up to 128 (all
  architectures) and even query / key lengths (its masked training kernels need them).
  Checked here instead of catching cuDNN's errors: under remat those surface only when the
  step is differentiated, outside this call.
  """
  device = jax.devices()[0]
  head_dim, q_len, k_len = query.shape[-1], query.shape[1], key.shape[1]
  return (device.platform == "gpu" and device.device_kind.startswith("NVIDIA")
          and query.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
          and head_dim <= 128 and q_len % 2 == 0 and k_len % 2 == 0)


def einsum_attention(query: Array, key: Array, value: Array, mask: Array,
                     dropout_rate: float = 0.0, dropout_key: Array | None = None) -> Array:
  """Hand-written attention (the reference path): the only one with dropout on probabilities.

  Shapes as ``jax.nn.dot_product_attention``: query (batch, q, heads, d), key / value
  (batch, k, kv_heads, d), boolean mask (batch, 1, q, k), True = attend. Logits and
  softmax in float32; masked logits get float32's minimum (as HF does), so a fully masked
  row attends uniformly to every key, as in ``dot_product_attention``'s XLA path.
  """
  b, lq, num_heads, head_dim = query.shape
  num_kv_heads = key.shape[2]
  q = query.reshape(b, lq, num_kv_heads, num_heads // num_kv_heads, head_dim)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", q, key, preferred_element_type=jnp.float32)
  logits = logits / np.sqrt(head_dim).astype(np.float32)
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = dropout(probs, dropout_rate, dropout_key).astype(value.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, value)
  return out.reshape(b, lq, num_heads, head_dim)


class KVSlot(NamedTuple):
  """An attention call's view of K/V carried along depth (a decode cache or a training buffer).

  ``k`` / ``v``: ``[batch, C, length, kv_heads, head_dim]`` for C entries. The call attends
  with entry ``entry`` over the whole length, after writing its own K/V there at position
  ``index`` when ``write`` (a traced bool, or a static True / False).
  """

  k: Array
  v: Array
  entry: Array
  write: Array | bool
  index: Array | int


def write_read(buffer: Array, new: Array | None, entry: Array, write: Array | bool,
               index: Array | int) -> tuple[Array, Array]:
  """``buffer`` [B, C, T, ...] with ``new`` [B, l, ...] written at ``[:, entry, index:index+l]``
  when ``write`` (never when ``new`` is None), and its entry ``entry`` [B, T, ...] after that."""
  if new is not None and write is not False:
    start = (0, entry, index) + (0,) * (new.ndim - 2)
    new = new[:, None].astype(buffer.dtype)
    if write is not True:
      new = jnp.where(write, new, jax.lax.dynamic_slice(buffer, start, new.shape))
    buffer = jax.lax.dynamic_update_slice(buffer, new, start)
  return buffer, jax.lax.dynamic_index_in_dim(buffer, entry, 1, keepdims=False)


class Attention(Projected):
  """Scaled dot-product attention with grouped K/V heads (MHA, GQA, MQA) and cross-attention.

  ``num_kv_heads`` K/V heads are shared by groups of ``num_heads // num_kv_heads`` query
  heads. ``implementation`` (``model.attention_impl``): ``einsum`` is ``einsum_attention``;
  ``xla`` and ``cudnn`` are ``jax.nn.dot_product_attention`` with that backend (same
  float32 logits and softmax; no dropout on probabilities); ``auto`` is ``einsum`` while
  attention dropout applies (rate > 0 and a dropout key), else ``cudnn`` where
  ``cudnn_fits``, else ``xla``. (``dot_product_attention(implementation=None)`` would always
  pick XLA in jax 0.10, hence the explicit choice.)

  With ``cache`` (a :class:`KVSlot`) the K/V projected from ``kv`` go through it (written
  when its ``write`` says so) and the call attends with the cached entry; ``kv`` may then be
  None (read only). It returns ``(output, cache)`` instead of the output.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x: Array, kv: Array | None, mask: Array, slot: Array | None = None,
               dropout_key: Array | None = None,
               cache: KVSlot | None = None,
               layer: Array | None = None) -> Array | tuple[Array, KVSlot]:
    dense = self.dense
    q = dense("query", (self.num_heads, self.head_dim), ("embed",), ("heads", "kv"))(
        x, slot, layer)
    k = v = None
    if kv is not None:
      kv_shape = (self.num_kv_heads, self.head_dim)
      k = dense("key", kv_shape, ("embed",), ("kv_heads", "kv"))(kv, slot, layer)
      v = dense("value", kv_shape, ("embed",), ("kv_heads", "kv"))(kv, slot, layer)
    if cache is not None:
      k_buffer, k = write_read(cache.k, k, cache.entry, cache.write, cache.index)
      v_buffer, v = write_read(cache.v, v, cache.entry, cache.write, cache.index)
      cache = cache._replace(k=k_buffer, v=v_buffer)
    drops = self.dropout_rate > 0 and dropout_key is not None
    impl = self.implementation
    if impl == "auto":
      impl = "einsum" if drops else "cudnn" if cudnn_fits(q, k) else "xla"
    if impl == "einsum":
      out = einsum_attention(q, k, v, mask, self.dropout_rate, dropout_key)
    elif drops:
      raise ValueError(f"attention implementation {impl!r} has no dropout on probabilities "
                       f"(dropout_rate={self.dropout_rate}); use 'einsum' or 'auto'")
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    out = dense("out", (x.shape[-1],), ("heads", "kv"), ("embed",))(out, slot, layer)
    return out if cache is None else (out, cache)


class MLP(Projected):
  """Position-wise FFN: relu / gelu / gelu_tanh, or SwiGLU (silu(x W_gate) * x W_up)."""

  d_ff: int
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x: Array, slot: Array | None = None, layer: Array | None = None) -> Array:
    dense = self.dense
    h = activation_fn(self.activation)(
        dense("wi", (self.d_ff,), ("embed",), ("mlp",))(x, slot, layer))
    if self.activation == "swiglu":
      h = h * dense("wi_up", (self.d_ff,), ("embed",), ("mlp",))(x, slot, layer)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return dense("wo", (x.shape[-1],), ("mlp",), ("embed",))(h, slot, layer)
