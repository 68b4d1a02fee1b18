"""The model families over one depth engine: decoder LM, encoder MLM, encoder-decoder, puzzle.

Each module takes a batch (keys: ``xlps.families``, which registers the families) and
returns logits. Extra outputs are sown into the ``intermediates`` collection (pass
``mutable=["intermediates"]``): ``hidden_states`` (last layer, before the output head;
encoder_decoder also ``encoder_hidden_states``) and ``pooled`` when ``pooler=True``.

Decoding: the generative families also take ``cache=`` (from :func:`init_cache`) and then
run a chunk of new positions against it and return ``(logits, cache)``. The cache holds,
per token, the K/V of each entry of the decoder's K/V plan (``model.kv_sharing``: every
applied layer, one per group of layers, or one per tied slot), stacked along depth and
carried by the same scan as training; encoder-decoders also keep the cross-attention K/V
of each cross-attention slot, computed once from the encoder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from xlps import families
from xlps.config import ModelSpec
from xlps.models import layers
from xlps.models.engine import Stack, cache_shapes

Array = jax.Array


class Embedder(nn.Module):
  """Token (+ position, + segment) embeddings of size E, optional norm, E->H projection."""

  spec: ModelSpec

  def setup(self):
    s = self.spec
    init = nn.initializers.truncated_normal(s.init_std)
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
        (s.vocab_size, s.embed_dim))
    if s.position_embedding == "learned":
      self.position_embedding = self.param(
          "position_embedding", nn.with_logical_partitioning(init, (None, "embed")),
          (s.max_len, s.embed_dim))
    if s.type_vocab_size:
      self.type_embedding = self.param(
          "type_embedding", nn.with_logical_partitioning(init, (None, "embed")),
          (s.type_vocab_size, s.embed_dim))
    if s.embed_norm:
      self.norm = layers.Norm(s.norm, s.norm_eps)
    if s.embed_dim != s.d_model:
      self.projection = layers.Dense((s.d_model,), ("factor",), ("embed",), init_std=s.init_std,
                                     dtype=s.dtype)

  def __call__(self, tokens: Array, positions: Array | None = None,
               token_types: Array | None = None, dropout_key: Array | None = None) -> Array:
    s = self.spec
    if s.position_embedding != "none" and tokens.shape[1] > s.max_len:
      # jnp.take would fill the missing positions with NaN, silently.
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds model.max_len={s.max_len} "
                       "positions; use sequences of at most max_len tokens or a larger max_len")
    x = jnp.take(self.embedding, tokens, axis=0)
    if s.scale_embeddings:
      x = x * jnp.sqrt(jnp.float32(s.embed_dim)).astype(x.dtype)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if s.position_embedding == "learned":
      x = x + jnp.take(self.position_embedding, positions, axis=0)
    elif s.position_embedding == "sinusoidal":
      x = x + jnp.asarray(layers.sinusoidal_positions(s.max_len, s.embed_dim))[positions]
    if s.type_vocab_size:
      types = jnp.zeros_like(tokens) if token_types is None else token_types
      x = x + jnp.take(self.type_embedding, types, axis=0)
    if s.embed_norm:
      x = self.norm(x)
    x = layers.dropout(x, s.dropout_rate, dropout_key).astype(s.dtype)
    if s.embed_dim != s.d_model:
      x = self.projection(x)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def attend(self, x: Array) -> Array:
    """Tied output projection ``x @ embedding.T`` (x has size E), in float32 (no bf16 logits)."""
    f32 = jnp.float32
    return jnp.einsum("ble,ve->blv", x.astype(f32), self.embedding.astype(f32))


class OutputHead(nn.Module):
  """Hidden states -> vocabulary logits.

  With ``mlm``, BERT/ALBERT's MLM transform (dense H->E, activation, norm) and a bias on
  the tied decoder; otherwise an H->E projection only when E < H. The vocabulary matmul
  runs in float32 whatever the compute dtype (as MaxText's ``logits_dot_in_fp32``).
  """

  spec: ModelSpec
  mlm: bool = False

  @nn.compact
  def __call__(self, x: Array, embedder: Embedder) -> Array:
    s = self.spec
    mlm = self.mlm
    dense = lambda feats, in_ax, out_ax, name, dtype=s.dtype: layers.Dense(  # noqa: E731
        feats, in_ax, out_ax, use_bias=s.use_bias, init_std=s.init_std, dtype=dtype, name=name)
    if mlm:
      x = dense((s.embed_dim,), ("embed",), ("factor",), "transform")(x)
      x = layers.activation_fn(s.activation)(x)
      x = layers.Norm(s.norm, s.norm_eps, axis_name="factor", name="transform_norm")(x)
    elif s.embed_dim != s.d_model and s.tie_embeddings:
      x = dense((s.embed_dim,), ("embed",), ("factor",), "projection")(x)
    if s.tie_embeddings:
      logits = embedder.attend(x)
      if mlm:
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                          (s.vocab_size,))
        logits = logits + bias.astype(logits.dtype)
    else:
      in_axis = "factor" if mlm else "embed"
      logits = dense((s.vocab_size,), (in_axis,), ("vocab",), "logits", "float32")(x)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class FamilyModule(nn.Module):
  """Base of the family modules: embedding dropout key, stacks (tied ones run by one module),
  final norm. A new family subclasses it and registers in ``xlps.families``."""

  spec: ModelSpec

  def _embed_key(self, deterministic: bool) -> Array | None:
    if deterministic or self.spec.dropout_rate == 0:
      return None
    return self.make_rng("dropout")

  def _final_norm(self, x: Array, name: str) -> Array:
    if self.spec.norm_position == "pre":
      x = layers.Norm(self.spec.norm, self.spec.norm_eps, name=name)(x)
    return x

  def _stacks(self) -> dict[str, Callable[..., Array]]:
    """Stack name -> its depth: the module owning its parameter groups, bound to its plan."""
    owners: dict[str, Stack] = {}
    for plan in self.spec.stacks:
      if plan.owner not in owners:
        owners[plan.owner] = Stack(self.spec, name=plan.owner)
    return {plan.name: functools.partial(owners[plan.owner], plan=plan)
            for plan in self.spec.stacks}

  def _encoder_only(self, batch: Mapping[str, Array], stack: str, mask: Array,
                    deterministic: bool, cache: Mapping | None = None,
                    iterations: Array | int | None = None, valid: Array | None = None):
    """Embeds ``batch["inputs"]`` and applies the family's one stack and final norm (with
    the stack's ``cache``: returns it updated too)."""
    embedder = Embedder(self.spec, name="embedder")
    x = embedder(batch["inputs"], batch.get("positions"), batch.get("token_types"),
                 self._embed_key(deterministic))
    x = self._stacks()[stack](x, mask=mask, deterministic=deterministic, cache=cache,
                              positions=batch.get("positions"), iterations=iterations,
                              valid=valid)
    if cache is not None:
      x, cache = x
    x = self._final_norm(x, "final_norm")
    self.sow("intermediates", "hidden_states", x)
    return x, embedder, cache


class DecoderLM(FamilyModule):
  """Causal decoder-only language model (GPT shape; Universal Transformer when M = 1)."""

  @nn.compact
  def __call__(self, batch: Mapping[str, Array], deterministic: bool = True,
               cache: Mapping | None = None,
               iterations: Array | int | None = None) -> Array | tuple[Array, dict]:
    segments = batch.get("segment_ids")
    valid = jnp.ones(batch["inputs"].shape, bool) if segments is None else segments != 0
    if cache is None:
      mask = layers.make_attention_mask(valid, valid, True, segments, segments)
      x, embedder, _ = self._encoder_only(batch, "decoder", mask, deterministic,
                                          iterations=iterations, valid=valid)
      return OutputHead(self.spec, name="head")(x, embedder)
    # Decoding: ``segment_ids`` 0 marks (left) padding; no packing.
    index = cache["index"]
    cache, mask, positions = _advance(cache, valid)
    batch = {**batch, "positions": batch.get("positions", positions)}
    x, embedder, stack = self._encoder_only(batch, "decoder", mask, deterministic,
                                            _stack_cache(cache, "decoder", index), iterations,
                                            valid)
    return OutputHead(self.spec, name="head")(x, embedder), _updated(cache, "decoder", stack)


class EncoderMLM(FamilyModule):
  """Bidirectional encoder with an MLM head (ALBERT / BERT shape)."""

  @nn.compact
  def __call__(self, batch: Mapping[str, Array], deterministic: bool = True,
               iterations: Array | int | None = None) -> Array:
    s = self.spec
    valid = batch.get("input_mask")
    valid = jnp.ones(batch["inputs"].shape, bool) if valid is None else valid.astype(bool)
    # Padding is masked as keys only (as BERT / HF do): padded queries still attend.
    mask = layers.make_attention_mask(jnp.ones_like(valid), valid)
    x, embedder, _ = self._encoder_only(batch, "encoder", mask, deterministic,
                                        iterations=iterations, valid=valid)
    if s.pooler:
      pooled = jnp.tanh(layers.Dense((s.d_model,), ("embed",), ("embed",), init_std=s.init_std,
                                     dtype=s.dtype, name="pooler")(x[:, 0]))
      self.sow("intermediates", "pooled", pooled)
    return OutputHead(s, mlm=True, name="head")(x, embedder)


class PuzzleNet(FamilyModule):
  """Non-causal net over a fixed-size grid, one answer token per cell (Sudoku, mazes, ARC).

  Without ``model.recursion`` it returns logits (a plain encoder of ``num_layers``). With
  it, the stack's depth is TRM / HRM latent recursion (``xlps.models.controllers.recursion``)
  and the call takes the previous supervision step's ``carried`` (y, z) ({} = a fresh
  start) and returns ``(logits, q, carried)``: the answer's logits from ``y``, the halting
  head's ``q`` [batch, 2] (halt, continue) from the mean of ``y`` over positions, and the
  new carry. The halting head starts at zero weights and bias -5 (TRM: "do not halt").
  The input embedding is scaled by sqrt(d_model / 2) as TRM scales it (configs set
  ``init_std`` = 1 / sqrt(d_model) and ``scale_embeddings=False``): without it the
  re-injected input is a fraction of y and z, and deep supervision stalls (the study's
  README has the pilots).
  """

  @nn.compact
  def __call__(self, batch: Mapping[str, Array], deterministic: bool = True,
               carried: Mapping | None = None) -> Array | tuple[Array, Array, dict]:
    s = self.spec
    valid = batch["inputs"] != 0
    mask = layers.make_attention_mask(jnp.ones_like(valid), valid)
    embedder = Embedder(s, name="embedder")
    x = embedder(batch["inputs"], None, None, self._embed_key(deterministic))
    net = self._stacks()["net"]
    if s.recursion is None:
      x = self._final_norm(net(x, mask=mask, deterministic=deterministic, valid=valid),
                           "final_norm")
      return OutputHead(s, name="head")(x, embedder)
    # TRM's input scale: (tokens + positions) x sqrt(d / 2), so that with embeddings drawn at
    # init_std = 1 / sqrt(d) the injected input is on the scale of the post-norm y and z.
    x = x * jnp.sqrt(s.d_model / 2.0).astype(x.dtype)
    y, carried = net(x, mask=mask, deterministic=deterministic, valid=valid,
                     carried={} if carried is None else carried)
    y = self._final_norm(y, "final_norm")
    pooled = (y * valid[..., None]).sum(1) / jnp.maximum(valid.sum(1, keepdims=True), 1)
    q = HaltingHead(name="halting_head")(pooled)
    return OutputHead(s, name="head")(y, embedder), q, carried


class HaltingHead(nn.Module):
  """(q_halt, q_continue) logits in float32 from a pooled state; starts at zero weights and
  bias -5 (TRM / HRM: every example goes on at first)."""

  @nn.compact
  def __call__(self, pooled: Array) -> Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("embed", None)),
                        (pooled.shape[-1], 2))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.constant(-5.0),
                                                           (None,)), (2,))
    return pooled.astype(jnp.float32) @ kernel + bias


def shift_right(targets: Array) -> Array:
  """Teacher-forcing decoder inputs: targets shifted right, 0 as the start token."""
  return jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]


class EncoderDecoder(FamilyModule):
  """Encoder-decoder Transformer (the seed article's model), optionally tied.

  With ``tie_encoder_decoder`` the decoder's plan names the encoder's self-attention and FFN
  groups (``xlps.families``), so one ``Stack`` module named ``encoder`` runs both passes and
  also holds the decoder's ``cross_attention`` and ``decoder_norms``.

  Decoding (``cache``): ``decoder_inputs`` is the chunk of new target positions; a batch
  that also has ``inputs`` (the source) encodes it and fills the cross-attention cache, later
  chunks read it. The chunk may be empty (length 0): that only encodes.
  """

  @nn.compact
  def __call__(self, batch: Mapping[str, Array], deterministic: bool = True,
               cache: Mapping | None = None) -> Array | tuple[Array, dict]:
    dec_in = batch.get("decoder_inputs")
    if cache is None:
      dec_in = shift_right(batch["targets"]) if dec_in is None else dec_in
    embedder = Embedder(self.spec, name="embedder")
    stacks = self._stacks()
    encoded = None
    if "inputs" in batch:
      src = batch["inputs"]
      src_valid = src != 0
      x = embedder(src, None, None, self._embed_key(deterministic))
      x = stacks["encoder"](x, mask=layers.make_attention_mask(jnp.ones_like(src_valid),
                                                               src_valid),
                            deterministic=deterministic, valid=src_valid)
      encoded = self._final_norm(x, "encoder_norm")
      self.sow("intermediates", "encoder_hidden_states", encoded)
    tgt_valid = jnp.ones(dec_in.shape, bool)
    positions = stack_cache = None
    if cache is None:
      mask = layers.make_attention_mask(tgt_valid, tgt_valid, causal=True)
    else:
      if encoded is not None:
        cache = {**cache, "source_valid": src_valid}
      src_valid = cache["source_valid"]
      index = cache["index"]
      cache, mask, positions = _advance(cache, tgt_valid)
      stack_cache = _stack_cache(cache, "decoder", index)
    y = embedder(dec_in, positions, None, self._embed_key(deterministic))
    scored = batch["targets"] != 0 if "targets" in batch and cache is None else None
    y = stacks["decoder"](y, mask=mask, encoded=encoded,
                          cross_mask=layers.make_attention_mask(tgt_valid, src_valid),
                          deterministic=deterministic, cache=stack_cache, positions=positions,
                          valid=scored)
    if cache is not None:
      y, stack_cache = y
    y = self._final_norm(y, "decoder_norm")
    self.sow("intermediates", "hidden_states", y)
    logits = OutputHead(self.spec, name="head")(y, embedder)
    return logits if cache is None else (logits, _updated(cache, "decoder", stack_cache))


# ------------------------------------------------------------------------------- decoding


def init_cache(spec: ModelSpec, batch_size: int, length: int,
               source_length: int = 0) -> dict[str, Array]:
  """An empty decode cache for ``length`` positions (prompt plus generated tokens).

  ``index``: the next position to write; ``valid`` [batch, length]: positions holding a
  real token (left padding stays False); per generating stack (``decoder``) its
  ``engine.cache_shapes`` buffers in the compute dtype; encoder-decoders also
  ``source_valid`` [batch, source_length].
  """
  stack = families.FAMILIES[spec.family].generates
  if stack is None:
    raise ValueError(f"model.family={spec.family!r} does not generate; decoding needs one of "
                     f"{', '.join(n for n, f in families.FAMILIES.items() if f.generates)}")
  if spec.family == "encoder_decoder" and source_length < 1:
    raise ValueError(f"an encoder_decoder cache needs source_length >= 1 (got {source_length})")
  shapes = cache_shapes(spec, spec.stack(stack), batch_size, length, source_length)
  cache = {"index": jnp.zeros((), jnp.int32), "valid": jnp.zeros((batch_size, length), bool),
           stack: {name: jnp.zeros(shape, spec.dtype) for name, shape in shapes.items()}}
  if source_length:
    cache["source_valid"] = jnp.zeros((batch_size, source_length), bool)
  return cache


def _advance(cache: Mapping, chunk_valid: Array) -> tuple[dict, Array, Array]:
  """A chunk of new positions at ``cache["index"]``: ``(cache, mask, positions)``, the cache
  with the chunk's validity marked and its index past the chunk, the chunk's decode mask
  and its default position ids (cache positions)."""
  index, length = cache["index"], chunk_valid.shape[1]
  valid = jax.lax.dynamic_update_slice(cache["valid"], chunk_valid, (0, index))
  positions = jnp.broadcast_to(index + jnp.arange(length), chunk_valid.shape)
  mask = layers.make_decode_mask(valid, index, length)
  return {**cache, "valid": valid, "index": index + length}, mask, positions


def _stack_cache(cache: Mapping, stack: str, index: Array) -> dict:
  """A stack's view of the cache: its buffers and the chunk's write position."""
  return {**cache[stack], "index": index}


def _updated(cache: Mapping, stack: str, stack_cache: Mapping) -> dict:
  return {**cache, stack: {k: v for k, v in stack_cache.items() if k != "index"}}
