"""The three model families over one depth engine: decoder LM, encoder MLM, encoder-decoder.

Batch keys (all int32, shape ``(batch, length)``):

* ``decoder_lm``: ``inputs``; optional ``segment_ids`` (packing; 0 = padding) and
  ``positions``. Returns next-token logits for every position.
* ``encoder_mlm`` (ALBERT / BERT): ``input_ids``; optional ``attention_mask`` (1 = token)
  and ``token_type_ids``. Returns MLM logits for every position.
* ``encoder_decoder``: ``inputs`` (source, 0 = padding) and ``targets``; optional
  ``decoder_inputs`` (default: ``targets`` shifted right with 0 as the start token).
  Returns logits over the target positions.

Extra outputs are sown into the ``intermediates`` collection (pass
``mutable=["intermediates"]``): ``hidden_states`` (last layer, before the output head;
encoder_decoder also ``encoder_hidden_states``) and ``pooled`` when ``pooler=True``.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from xlps.config import ModelSpec
from xlps.models import layers
from xlps.models.engine import Stack

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
      self.projection = layers.Dense((s.d_model,), ("factor",), ("embed",), 1, True,
                                     s.init_std, s.dtype)

  def __call__(self, tokens: Array, positions: Array | None = None,
               token_types: Array | None = None, dropout_key: Array | None = None) -> Array:
    s = self.spec
    if s.position_embedding != "none" and tokens.shape[1] > s.max_len:
      # jnp.take would fill the missing positions with NaN, silently.
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds model.max_len={s.max_len} "
                       "positions; use sequences of at most max_len tokens or a larger max_len")
    x = jnp.take(self.embedding, tokens, axis=0)
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

  The MLM family uses BERT/ALBERT's transform (dense H->E, activation, norm) and a bias
  on the tied decoder; other families project H->E only when E < H. The vocabulary matmul
  runs in float32 whatever the compute dtype (as MaxText's ``logits_dot_in_fp32``).
  """

  spec: ModelSpec

  @nn.compact
  def __call__(self, x: Array, embedder: Embedder) -> Array:
    s = self.spec
    mlm = s.family == "encoder_mlm"
    dense = lambda feats, in_ax, out_ax, name, dtype=s.dtype: layers.Dense(  # noqa: E731
        feats, in_ax, out_ax, 1, s.use_bias, s.init_std, dtype, name=name)
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


def _counts(plans) -> tuple[tuple[str, int], ...]:
  return tuple((comp, plan.num_unique) for comp, plan in plans.items())


class _Family(nn.Module):
  """Shared pieces: embedder, output head, final norm, dropout key for the embeddings."""

  spec: ModelSpec

  def _embed_key(self, deterministic: bool) -> Array | None:
    if deterministic or self.spec.dropout_rate == 0:
      return None
    return self.make_rng("dropout")

  def _final_norm(self, x: Array, name: str) -> Array:
    if self.spec.norm_position == "pre":
      x = layers.Norm(self.spec.norm, self.spec.norm_eps, name=name)(x)
    return x


class DecoderLM(_Family):
  """Causal decoder-only language model (GPT shape; Universal Transformer when M = 1)."""

  @nn.compact
  def __call__(self, batch: Mapping[str, Array], deterministic: bool = True) -> Array:
    s = self.spec
    tokens = batch["inputs"]
    segments = batch.get("segment_ids")
    valid = jnp.ones(tokens.shape, bool) if segments is None else segments != 0
    mask = layers.make_attention_mask(valid, valid, True, segments, segments)
    embedder = Embedder(s, name="embedder")
    x = embedder(tokens, batch.get("positions"), None, self._embed_key(deterministic))
    plans = s.stack_plans("decoder")
    x = Stack(s, _counts(plans), name="decoder")(x, plans, mask, deterministic=deterministic)
    x = self._final_norm(x, "final_norm")
    self.sow("intermediates", "hidden_states", x)
    return OutputHead(s, name="head")(x, embedder)


class EncoderMLM(_Family):
  """Bidirectional encoder with an MLM head (ALBERT / BERT shape)."""

  @nn.compact
  def __call__(self, batch: Mapping[str, Array], deterministic: bool = True) -> Array:
    s = self.spec
    tokens = batch["input_ids"]
    valid = batch.get("attention_mask")
    valid = jnp.ones(tokens.shape, bool) if valid is None else valid.astype(bool)
    # Padding is masked as keys only (as BERT / HF do): padded queries still attend.
    mask = layers.make_attention_mask(jnp.ones_like(valid), valid)
    embedder = Embedder(s, name="embedder")
    x = embedder(tokens, batch.get("position_ids"), batch.get("token_type_ids"),
                 self._embed_key(deterministic))
    plans = s.stack_plans("encoder")
    x = Stack(s, _counts(plans), name="encoder")(x, plans, mask, deterministic=deterministic)
    x = self._final_norm(x, "final_norm")
    self.sow("intermediates", "hidden_states", x)
    if s.pooler:
      pooled = jnp.tanh(layers.Dense((s.d_model,), ("embed",), ("embed",), 1, True, s.init_std,
                                     s.dtype, name="pooler")(x[:, 0]))
      self.sow("intermediates", "pooled", pooled)
    return OutputHead(s, name="head")(x, embedder)


def shift_right(targets: Array) -> Array:
  """Teacher-forcing decoder inputs: targets shifted right, 0 as the start token."""
  return jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]


class EncoderDecoder(_Family):
  """Encoder-decoder Transformer (the seed article's model), optionally tied.

  With ``tie_encoder_decoder`` one ``Stack`` named ``encoder`` serves both sides: the
  decoder pass reuses its self-attention and FFN slots (with a causal mask) and owns
  ``cross_attention`` and ``decoder_norms``.
  """

  @nn.compact
  def __call__(self, batch: Mapping[str, Array], deterministic: bool = True) -> Array:
    s = self.spec
    src, tgt = batch["inputs"], batch["targets"]
    dec_in = batch.get("decoder_inputs")
    dec_in = shift_right(tgt) if dec_in is None else dec_in
    src_valid = src != 0
    tgt_valid = jnp.ones(dec_in.shape, bool)
    embedder = Embedder(s, name="embedder")
    enc_plans, dec_plans = s.stack_plans("encoder"), s.stack_plans("decoder")
    if s.tie_encoder_decoder:
      counts = _counts(enc_plans) + (("cross_attention", dec_plans["cross_attention"].num_unique),
                                     ("decoder_norms", dec_plans["norms"].num_unique))
      encoder = decoder = Stack(s, counts, decoder_norms=True, name="encoder")
    else:
      encoder = Stack(s, _counts(enc_plans), name="encoder")
      decoder = Stack(s, _counts(dec_plans), name="decoder")
    x = embedder(src, None, None, self._embed_key(deterministic))
    x = encoder(x, enc_plans, layers.make_attention_mask(jnp.ones_like(src_valid), src_valid),
                deterministic=deterministic)
    encoded = self._final_norm(x, "encoder_norm")
    self.sow("intermediates", "encoder_hidden_states", encoded)
    y = embedder(dec_in, None, None, self._embed_key(deterministic))
    y = decoder(y, dec_plans, layers.make_attention_mask(tgt_valid, tgt_valid, causal=True),
                encoded, layers.make_attention_mask(tgt_valid, src_valid),
                deterministic=deterministic)
    y = self._final_norm(y, "decoder_norm")
    self.sow("intermediates", "hidden_states", y)
    return OutputHead(s, name="head")(y, embedder)


FAMILY_MODULES = {"decoder_lm": DecoderLM, "encoder_mlm": EncoderMLM,
                  "encoder_decoder": EncoderDecoder}
