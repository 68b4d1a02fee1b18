"""Token selection and search for generation: sampling filters and beam search.

Model-agnostic: a model enters only as ``step_fn(tokens, state) -> (log_probs, state)``, so
these algorithms are tested against brute force without a network. Everything is
jit-compatible: hyperparameters are static Python numbers and the decode loop is one
``jax.lax.while_loop``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = float("-inf")


def filter_logits(logits: Array, *, top_k: int = 0, top_p: float = 1.0) -> Array:
  """``logits`` (float32, vocabulary last) with every filtered-out entry set to -inf.

  ``top_k`` keeps exactly the k largest (ties go to the lower index; 0 keeps all). ``top_p``
  then acts on the distribution renormalised over what top_k kept: sorted by descending
  probability, a token stays when the mass strictly before it is < top_p, so the kept set is
  the smallest whose mass is >= top_p (mass exactly top_p stops it). The most likely token
  always stays, whatever top_p; 1.0 keeps all.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  if 0 < top_k < vocab:
    values, indices = jax.lax.top_k(logits, top_k)
    logits = jnp.put_along_axis(jnp.full_like(logits, NEG_INF), indices, values, axis=-1,
                                inplace=False)
  if top_p < 1.0:
    sorted_logits, order = jax.lax.top_k(logits, vocab)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cumulative = jnp.cumsum(probs, axis=-1)
    mass_before = jnp.concatenate([jnp.zeros_like(cumulative[..., :1]), cumulative[..., :-1]],
                                  axis=-1)
    keep_sorted = (mass_before < top_p).at[..., 0].set(True)
    keep = jnp.put_along_axis(jnp.zeros_like(keep_sorted), order, keep_sorted, axis=-1,
                              inplace=False)
    logits = jnp.where(keep, logits, NEG_INF)
  return logits


def sample_logits(logits: Array, key: Array | None, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> Array:
  """Next tokens [B] (int32) from logits [B, V].

  Greedy argmax when ``temperature == 0`` or ``key`` is None; otherwise divides by the
  temperature, applies ``filter_logits`` (top_k, then top_p) and samples.
  """
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature == 0 or key is None:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def length_penalty(length: Array, alpha: float) -> Array:
  """GNMT length penalty ``((5 + length) / 6) ** alpha`` (alpha 0: no penalty, all ones)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


class BeamResult(NamedTuple):
  """Beam search output, best hypothesis first along axis 1.

  A score of -inf marks padding: the model allowed fewer than K hypotheses.
  """

  tokens: Array   # [B, K, max_len] int32; 0 (pad) after EOS
  scores: Array   # [B, K] float32: sum of log-probs / length_penalty(length, alpha)
  lengths: Array  # [B, K] int32: tokens generated including the EOS (max_len without one)


class _Beams(NamedTuple):
  """The while_loop carry of ``beam_search``; finished beams are kept sorted, best first."""

  step: Array         # int32 scalar: tokens generated so far
  last: Array         # [B, K] int32: token each alive beam feeds next
  alive_seqs: Array   # [B, K, max_len] int32
  alive_logp: Array   # [B, K] float32: sum of log-probs
  state: Any          # step_fn's state, batched leaves [B * K, ...]
  fin_seqs: Array     # [B, K, max_len] int32
  fin_scores: Array   # [B, K] float32
  fin_lengths: Array  # [B, K] int32


def _take_beams(x: Array, index: Array) -> Array:
  """``x[b, index[b, j]]`` for each batch row b: picks beams along axis 1."""
  return jax.vmap(lambda row, i: row[i])(x, index)


def _best(k: int, scores: Array, *arrays: Array) -> tuple[Array, ...]:
  """The k best entries along axis 1 of ``scores`` and the matching entries of ``arrays``."""
  top, index = jax.lax.top_k(scores, k)
  return (top, *(_take_beams(a, index) for a in arrays))


def _map_batched(fn: Callable[[Array], Array], state: Any) -> Any:
  """Applies ``fn`` to the batched (ndim >= 1) leaves of ``state``; 0-d leaves pass through."""
  return jax.tree.map(lambda x: fn(x) if jnp.ndim(x) else x, state)


def beam_search(step_fn: Callable[[Array, Any], tuple[Array, Any]], state: Any,
                first_tokens: Array, *, beam_size: int, max_len: int, eos_id: int,
                alpha: float = 0.6) -> BeamResult:
  """The ``beam_size`` best continuations of ``first_tokens`` [B] under ``step_fn``.

  ``state`` is a pytree whose leaves of ndim >= 1 have a leading batch axis B (a KV cache);
  they are repeated per beam (row b * K + k) and reordered by the chosen parent beams after
  every step, while 0-d leaves (a shared write index) pass through untouched. ``step_fn(
  tokens [B * K], state)`` returns log-softmax log-probs [B * K, V] and a state of the same
  structure, shapes and dtypes.

  Each step, every alive beam's EOS extension becomes a finished candidate (score: log-prob
  sum / ``length_penalty(length incl. EOS, alpha)``) and the K best non-EOS extensions stay
  alive; the finished set keeps the K best. This considers every EOS extension, a superset
  of the EOS candidates in the top 2K that the usual formulation keeps. At the first step
  only beam 0 of a row is live, so the K beams are distinct. The loop stops early once no
  alive beam can beat a row's K-th finished score: log-probs are <= 0, so an alive beam's
  best possible score is its sum over the largest penalty still reachable. At ``max_len``
  the alive beams count as finished with length max_len. Ties go to the finished beam, then
  the lower index. ``beam_size=1`` is not greedy decoding: it keeps the best EOS extension
  seen, which can outscore the greedy path.
  """
  batch, k = first_tokens.shape[0], beam_size

  def cond(c: _Beams) -> Array:
    reachable = jnp.maximum(length_penalty(c.step + 1, alpha), length_penalty(max_len, alpha))
    best_alive = c.alive_logp.max(axis=1) / reachable
    return (c.step < max_len) & jnp.any(best_alive > c.fin_scores[:, -1])

  def body(c: _Beams) -> _Beams:
    log_probs, state = step_fn(c.last.reshape(-1), c.state)
    vocab = log_probs.shape[-1]
    logp = c.alive_logp[..., None] + log_probs.astype(jnp.float32).reshape(batch, k, vocab)
    length = c.step + 1

    eos_scores = logp[..., eos_id] / length_penalty(length, alpha)
    eos_seqs = c.alive_seqs.at[:, :, c.step].set(eos_id)
    fin_scores, fin_seqs, fin_lengths = _best(
        k, jnp.concatenate([c.fin_scores, eos_scores], axis=1),
        jnp.concatenate([c.fin_seqs, eos_seqs], axis=1),
        jnp.concatenate([c.fin_lengths, jnp.full((batch, k), length, jnp.int32)], axis=1))

    flat = logp.at[..., eos_id].set(NEG_INF).reshape(batch, k * vocab)
    alive_logp, index = jax.lax.top_k(flat, k)
    parent, token = index // vocab, (index % vocab).astype(jnp.int32)
    alive_seqs = _take_beams(c.alive_seqs, parent).at[:, :, c.step].set(token)
    rows = (jnp.arange(batch)[:, None] * k + parent).reshape(-1)
    state = _map_batched(lambda x: x[rows], state)
    return _Beams(length, token, alive_seqs, alive_logp, state, fin_seqs, fin_scores,
                  fin_lengths)

  alive_logp = jnp.full((batch, k), NEG_INF, jnp.float32).at[:, 0].set(0.0)
  init = _Beams(
      step=jnp.zeros((), jnp.int32),
      last=jnp.repeat(first_tokens.astype(jnp.int32)[:, None], k, axis=1),
      alive_seqs=jnp.zeros((batch, k, max_len), jnp.int32),
      alive_logp=alive_logp,
      state=_map_batched(lambda x: jnp.repeat(x, k, axis=0), state),
      fin_seqs=jnp.zeros((batch, k, max_len), jnp.int32),
      fin_scores=jnp.full((batch, k), NEG_INF, jnp.float32),
      fin_lengths=jnp.zeros((batch, k), jnp.int32))
  c = jax.lax.while_loop(cond, body, init)

  # Alive beams are hypotheses only at max_len; after an early stop they are prefixes that
  # cannot beat the finished ones.
  alive_scores = jnp.where(c.step == max_len, c.alive_logp / length_penalty(max_len, alpha),
                           NEG_INF)
  scores, tokens, lengths = _best(
      k, jnp.concatenate([c.fin_scores, alive_scores], axis=1),
      jnp.concatenate([c.fin_seqs, c.alive_seqs], axis=1),
      jnp.concatenate([c.fin_lengths, jnp.full((batch, k), max_len, jnp.int32)], axis=1))
  return BeamResult(tokens, scores, lengths)
