"""Generation through the K/V cache along applied depth: prompts in, tokens out.

A decoder LM prefills its (left-padded) prompts in one chunk, then a ``jax.lax.while_loop``
feeds one token per step until every row has emitted EOS or ``max_new_tokens``; an
encoder-decoder encodes its sources once (filling the cross-attention cache) and decodes
from the start token, by sampling or by beam search. Token choice and search are
``xlps.decoding``; the cache and how a chunk runs against it are the model's
(``xlps.models.transformer``: ``init_cache``, ``cache=``).

Bad requests (prompt too long for the position table, empty prompt, sampling out of
range, the wrong family) raise ``ConfigError`` naming the value and what would be valid.

Both loops compile once per batch shape: the cache is carried by the model's one scan over
depth, so compile time does not grow with the applied depth (``bench/decode.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xlps import decoding
from xlps.config import ConfigError, ModelSpec
from xlps.data.tokenizers import EOS, PAD
from xlps.models import transformer

Array = jax.Array
StepFn = Callable[[Array, Any], tuple[Array, Any]]


class Generated(NamedTuple):
  """Generated tokens [B, T] (PAD after a row's EOS) and lengths [B] (EOS included); the
  logits [B, T, V] each token was chosen from (``return_logits``); beam search's score
  [B] (sum of log-probs / length penalty)."""

  tokens: Array
  lengths: Array
  logits: Array | None = None
  scores: Array | None = None


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How each next token is chosen: greedy (temperature 0) or sampled (``decoding``)."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    checks = (("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
              ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 = all)"),
              ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 = all)"))
    for name, ok, valid in checks:
      if not ok:
        raise ConfigError(f"sampling {name}={getattr(self, name)!r} must be {valid}")


def left_pad(prompts: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
  """Prompts of different lengths as one batch, left-padded so all end at the same cache
  position: ``inputs``, ``segment_ids`` (1 = token, 0 = padding), ``positions`` (each
  prompt's own 0, 1, ...) and ``lengths``."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ConfigError("every prompt needs at least one token (prepend BOS to an empty one)")
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  width = int(lengths.max())
  inputs = np.zeros((len(prompts), width), np.int32)
  for row, prompt in enumerate(prompts):
    inputs[row, width - len(prompt):] = prompt
  segment_ids = (np.arange(width)[None] >= (width - lengths)[:, None]).astype(np.int32)
  positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
  return {"inputs": inputs, "segment_ids": segment_ids, "positions": positions,
          "lengths": lengths}


def check_length(spec: ModelSpec, length: int, what: str) -> None:
  """ValueError unless ``length`` positions fit the model's position table."""
  if spec.position_embedding != "none" and length > spec.max_len:
    raise ConfigError(f"{what} needs {length} positions but model.max_len={spec.max_len}; "
                     f"ask for at most {spec.max_len} in all (prompt plus new tokens)")


def sample_loop(step_fn: StepFn, state: Any, logits: Array, *, max_new_tokens: int,
                sampling: Sampling, eos_id: int = EOS,
                return_logits: bool = False) -> Generated:
  """Tokens chosen one at a time from ``logits`` [B, V] (the first token's), feeding each
  through ``step_fn(tokens [B], state) -> (next logits [B, V], state)``.

  Stops when every row has emitted ``eos_id`` or after ``max_new_tokens``; step t samples
  with ``fold_in(PRNGKey(seed), t)``: deterministic given the seed.
  """
  batch = logits.shape[0]
  key = jax.random.PRNGKey(sampling.seed) if sampling.temperature > 0 else None
  tokens = jnp.zeros((batch, max_new_tokens), jnp.int32)
  chosen_from = jnp.zeros((batch, max_new_tokens, logits.shape[-1]), jnp.float32) \
      if return_logits else None

  def body(carry):
    t, logits, state, tokens, done, lengths, chosen_from = carry
    token = decoding.sample_logits(
        logits, None if key is None else jax.random.fold_in(key, t),
        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    token = jnp.where(done, PAD, token)
    tokens = tokens.at[:, t].set(token)
    if chosen_from is not None:
      chosen_from = chosen_from.at[:, t].set(logits.astype(jnp.float32))
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | (token == eos_id)
    logits, state = step_fn(token, state)
    return t + 1, logits, state, tokens, done, lengths, chosen_from

  def cond(carry):
    return (carry[0] < max_new_tokens) & ~jnp.all(carry[4])

  carry = (jnp.int32(0), logits, state, tokens, jnp.zeros(batch, bool),
           jnp.zeros(batch, jnp.int32), chosen_from)
  _, _, _, tokens, _, lengths, chosen_from = jax.lax.while_loop(cond, body, carry)
  return Generated(tokens, lengths, chosen_from)


# ------------------------------------------------------------------------ decoder LM


def lm_prefill(module: nn.Module, params: Any, batch: dict[str, Array],
               cache: dict) -> tuple[Array, dict]:
  """Runs the padded prompts against an empty cache: (last position's logits, cache)."""
  logits, cache = module.apply({"params": params},
                               {k: batch[k] for k in ("inputs", "segment_ids", "positions")},
                               cache=cache)
  return logits[:, -1], cache


def lm_decode(module: nn.Module, params: Any, logits: Array, cache: dict, lengths: Array, *,
              max_new_tokens: int, sampling: Sampling, eos_id: int = EOS,
              return_logits: bool = False) -> Generated:
  """The decode loop after :func:`lm_prefill`; row b's new tokens take positions
  ``lengths[b], lengths[b] + 1, ...`` (its own, whatever its padding)."""
  def step(token, state):
    cache, position = state
    out, cache = module.apply({"params": params},
                              {"inputs": token[:, None], "positions": position[:, None]},
                              cache=cache)
    return out[:, 0], (cache, position + 1)

  return sample_loop(step, (cache, lengths), logits, max_new_tokens=max_new_tokens,
                     sampling=sampling, eos_id=eos_id, return_logits=return_logits)


class LMGenerator:
  """Jitted prefill and decode loop of a decoder LM (one compile per batch shape).

  ``LMGenerator(spec, 64)(params, prompts)`` continues token-id prompts; ``start``,
  ``prefill`` and ``decode`` are the three stages, for timing them apart.
  """

  def __init__(self, spec: ModelSpec, max_new_tokens: int, sampling: Sampling = Sampling(),
               eos_id: int = EOS, return_logits: bool = False):
    if spec.family != "decoder_lm":
      raise ConfigError(f"LMGenerator needs model.family='decoder_lm' (got {spec.family!r}); "
                        "encoder_decoder models use Seq2SeqGenerator")
    if max_new_tokens < 1:
      raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
    self.spec, self.max_new_tokens = spec, max_new_tokens
    module = transformer.DecoderLM(spec)
    self.prefill = jax.jit(functools.partial(lm_prefill, module))
    self.decode = jax.jit(functools.partial(
        lm_decode, module, max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id,
        return_logits=return_logits))

  def start(self, prompts: Sequence[Sequence[int]]) -> tuple[dict, dict]:
    """The padded batch and the empty cache for ``prompts``."""
    batch = left_pad(prompts)
    width = batch["inputs"].shape[1]
    check_length(self.spec, int(batch["lengths"].max()) + self.max_new_tokens,
                 f"max_new_tokens={self.max_new_tokens} after a {width}-token prompt")
    return batch, transformer.init_cache(self.spec, len(prompts), width + self.max_new_tokens)

  def __call__(self, params: Any, prompts: Sequence[Sequence[int]]) -> Generated:
    """The continuations of ``prompts`` (token lists)."""
    batch, cache = self.start(prompts)
    logits, cache = self.prefill(params, batch, cache)
    return self.decode(params, logits, cache, batch["lengths"])


# -------------------------------------------------------------------- encoder-decoder


def seq2seq_start(module: nn.Module, params: Any, sources: Array, cache: dict) -> dict:
  """Encodes ``sources`` (0-padded) into the cache (an empty decoder chunk)."""
  empty = jnp.zeros((sources.shape[0], 0), jnp.int32)
  _, cache = module.apply({"params": params}, {"inputs": sources, "decoder_inputs": empty},
                          cache=cache)
  return cache


def seq2seq_step(module: nn.Module, params: Any) -> StepFn:
  """``step_fn`` feeding one decoder token per row: (next logits [B, V], cache)."""
  def step(token, cache):
    out, cache = module.apply({"params": params}, {"decoder_inputs": token[:, None]},
                              cache=cache)
    return out[:, 0], cache
  return step


class Seq2SeqGenerator:
  """Jitted encode-then-decode of an encoder-decoder: beam search when ``beam_size`` > 1
  (GNMT length penalty ``alpha``), else greedy / sampling; the start token is 0."""

  def __init__(self, spec: ModelSpec, max_len: int, beam_size: int = 1, alpha: float = 0.6,
               sampling: Sampling = Sampling(), eos_id: int = EOS,
               return_logits: bool = False):
    if spec.family != "encoder_decoder":
      raise ConfigError(f"Seq2SeqGenerator needs model.family='encoder_decoder' (got "
                        f"{spec.family!r}); decoder LMs use LMGenerator")
    if max_len < 1 or beam_size < 1:
      raise ConfigError(f"max_len={max_len} and beam_size={beam_size} must be >= 1")
    check_length(spec, max_len, f"max_len={max_len}")
    self.spec = spec
    module = transformer.EncoderDecoder(spec)

    def run(params, sources):
      cache = transformer.init_cache(spec, sources.shape[0], max_len, sources.shape[1])
      cache = seq2seq_start(module, params, sources, cache)
      step = seq2seq_step(module, params)
      start = jnp.zeros(sources.shape[0], jnp.int32)
      if beam_size > 1:
        def log_probs(token, cache):
          logits, cache = step(token, cache)
          return jax.nn.log_softmax(logits), cache
        result = decoding.beam_search(log_probs, cache, start, beam_size=beam_size,
                                      max_len=max_len, eos_id=eos_id, alpha=alpha)
        return Generated(result.tokens[:, 0], result.lengths[:, 0], scores=result.scores[:, 0])
      logits, cache = step(start, cache)
      return sample_loop(step, cache, logits, max_new_tokens=max_len, sampling=sampling,
                         eos_id=eos_id, return_logits=return_logits)

    self.run = jax.jit(run)

  def __call__(self, params: Any, sources: Sequence[Sequence[int]] | np.ndarray) -> Generated:
    """The outputs for ``sources`` (token lists, or a 0-padded array)."""
    if not isinstance(sources, np.ndarray):
      width = max(len(s) for s in sources)
      padded = np.zeros((len(sources), width), np.int32)
      for row, source in enumerate(sources):
        padded[row, :len(source)] = source
      sources = padded
    check_length(self.spec, sources.shape[1], f"a {sources.shape[1]}-token source")
    return self.run(params, jnp.asarray(sources, jnp.int32))
