"""Sampling filters and beam search against exact references (no model needed).

Beam search runs on toy "models" whose log-probs are fixed tables indexed by the last token
or by the whole history kept in the state, and is checked against brute-force enumeration
of every hypothesis and a plain-Python beam search, both in float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlps import decoding

EOS = 2
VOCAB = 5


def _frequencies(tokens, vocab):
  return np.bincount(np.asarray(tokens).ravel(), minlength=vocab) / np.asarray(tokens).size


def _samples(logits, num=20000, seed=0, **kwargs):
  """``num`` draws from ``sample_logits`` over ``num`` keys, one row of logits each."""
  keys = jax.random.split(jax.random.key(seed), num)
  draw = jax.jit(jax.vmap(lambda key: decoding.sample_logits(logits[None], key, **kwargs)[0]))
  return draw(keys)


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max())
  return e / e.sum()


# Sampling.

def test_greedy_is_argmax():
  logits = jax.random.normal(jax.random.key(0), (4, 7))
  want = np.argmax(np.asarray(logits), axis=-1)
  for tokens in (decoding.sample_logits(logits, None),
                 decoding.sample_logits(logits, jax.random.key(1), temperature=0.0, top_k=3)):
    assert tokens.dtype == jnp.int32 and tokens.shape == (4,)
    np.testing.assert_array_equal(tokens, want)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies(temperature):
  logits = jnp.array([1.0, 0.2, -0.5, 2.0, 0.0])
  freq = _frequencies(_samples(logits, temperature=temperature), VOCAB)
  np.testing.assert_allclose(freq, _softmax(np.asarray(logits) / temperature), atol=0.015)


def test_top_k_keeps_the_k_largest():
  logits = jnp.array([[1.0, 0.2, -0.5, 2.0, 0.0], [0.0, 3.0, 1.0, 1.0, -1.0]])
  filtered = np.asarray(decoding.filter_logits(logits, top_k=2))
  kept = np.isfinite(filtered)
  np.testing.assert_array_equal(kept, [[1, 0, 0, 1, 0], [0, 1, 1, 0, 0]])  # tie: lower index
  np.testing.assert_array_equal(filtered[kept], np.asarray(logits)[kept])
  assert (filtered[~kept] == -np.inf).all()

  tokens = _samples(logits[0], temperature=0.8, top_k=2)
  assert set(np.unique(tokens)) <= {0, 3}
  want = np.zeros(VOCAB)
  want[[0, 3]] = _softmax(np.asarray(logits[0])[[0, 3]] / 0.8)
  np.testing.assert_allclose(_frequencies(tokens, VOCAB), want, atol=0.015)


def _nucleus(probs, **kwargs):
  """Indices ``filter_logits`` keeps for a distribution given as probabilities."""
  logits = jnp.log(jnp.array(probs, jnp.float32))[None]
  return set(np.flatnonzero(np.isfinite(decoding.filter_logits(logits, **kwargs)[0])))


def test_top_p_keeps_the_nucleus():
  # Permuted [0.5, 0.3, 0.15, 0.05]: a token stays while the mass before it is < top_p.
  probs = [0.15, 0.5, 0.05, 0.3]
  assert _nucleus(probs, top_p=0.45) == {1}
  assert _nucleus(probs, top_p=0.75) == {1, 3}
  assert _nucleus(probs, top_p=0.85) == {1, 3, 0}
  assert _nucleus(probs, top_p=0.99) == {0, 1, 2, 3}
  assert _nucleus(probs, top_p=1.0) == {0, 1, 2, 3}
  # Mass exactly top_p (dyadic, exact in float32): the smallest set with mass >= top_p.
  dyadic = [0.125, 0.25, 0.125, 0.5]
  assert _nucleus(dyadic, top_p=0.5) == {3}
  assert _nucleus(dyadic, top_p=0.75) == {3, 1}
  # The argmax always stays.
  assert _nucleus(probs, top_p=1e-6) == {1}
  assert _nucleus(probs, top_p=0.0) == {1}
  # top_p acts on what top_k kept, renormalised: [0.5, 0.3, 0.15] / 0.95 reaches 0.83 in two.
  assert _nucleus(probs, top_p=0.83) == {1, 3, 0}
  assert _nucleus(probs, top_k=3, top_p=0.83) == {1, 3}


def test_top_p_samples_the_renormalised_nucleus():
  probs = np.array([0.15, 0.5, 0.05, 0.3])
  tokens = _samples(jnp.log(jnp.array(probs, jnp.float32)), top_p=0.75)
  want = np.array([0.0, 0.5, 0.0, 0.3]) / 0.8
  np.testing.assert_allclose(_frequencies(tokens, 4), want, atol=0.015)


def test_sampling_is_deterministic_and_jits():
  logits = jax.random.normal(jax.random.key(0), (16, 11))
  key = jax.random.key(3)
  kwargs = dict(temperature=0.7, top_k=6, top_p=0.9)
  eager = decoding.sample_logits(logits, key, **kwargs)
  np.testing.assert_array_equal(eager, decoding.sample_logits(logits, key, **kwargs))
  jitted = jax.jit(functools.partial(decoding.sample_logits, **kwargs))
  np.testing.assert_array_equal(jitted(logits, key), eager)
  other = decoding.sample_logits(logits, jax.random.key(4), **kwargs)
  assert (np.asarray(other) != np.asarray(eager)).any()


def test_length_penalty():
  lengths = jnp.array([1, 4, 10])
  np.testing.assert_allclose(decoding.length_penalty(lengths, 0.0), 1.0)
  np.testing.assert_allclose(decoding.length_penalty(lengths, 0.6),
                             ((5.0 + np.array([1, 4, 10])) / 6.0) ** 0.6, rtol=1e-6)


# Beam search: toy models, each a step_fn and the same model as a float64 Python function
# logp(row, prefix) of the prefix fed so far (the first token included).

def _log_softmax(logits):
  return np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)), np.float64)


def _markov_step(tokens, state):
  """Log-probs from a per-row table [B, V, V] of the last token, read from ``tokens``."""
  return state["table"][jnp.arange(tokens.shape[0]), tokens], state


def _markov_model(seed, batch, eos_bias=0.0):
  """``_markov_step`` with random tables."""
  logits = np.random.default_rng(seed).normal(size=(batch, VOCAB, VOCAB))
  logits[..., EOS] += eos_bias
  table = _log_softmax(logits)
  state = {"table": jnp.asarray(table, jnp.float32)}
  return _markov_step, state, lambda row, prefix: table[row, prefix[-1]]


def _history_model(seed, batch, max_len, eos_bias=0.0):
  """Log-probs from a per-row table of the whole prefix, read only through the state.

  The state holds a [B, max_len] history written at the step index (a 0-d leaf); the
  prefix is coded injectively, so a beam whose history came from the wrong parent gets
  another beam's log-probs and the scores leave the brute-force reference.
  """
  base = VOCAB + 1
  logits = np.random.default_rng(seed).normal(size=(batch, base ** max_len, VOCAB))
  logits[..., EOS] += eos_bias
  table = _log_softmax(logits)
  powers = base ** np.arange(max_len)

  def code(prefix):
    return int(sum((t + 1) * p for t, p in zip(prefix, powers)))

  def step_fn(tokens, state):
    step = state["step"]
    history = state["history"].at[:, step].set(tokens)
    written = jnp.arange(max_len) <= step
    codes = jnp.sum(jnp.where(written, history + 1, 0) * powers, axis=1)
    log_probs = state["table"][jnp.arange(tokens.shape[0]), codes]
    return log_probs, {"history": history, "step": step + 1, "table": state["table"]}

  state = {"history": jnp.zeros((batch, max_len), jnp.int32),
           "step": jnp.zeros((), jnp.int32),
           "table": jnp.asarray(table, jnp.float32)}
  return step_fn, state, lambda row, prefix: table[row, code(prefix)]


def _penalty(length, alpha):
  return ((5.0 + length) / 6.0) ** alpha


def _brute_force(logp, first, max_len, alpha):
  """Every hypothesis (score, tokens, length), best first: EOS at any step or none."""
  hypotheses = []

  def extend(prefix, total):
    row = logp(prefix)
    for token in range(VOCAB):
      seq, score = prefix[1:] + (token,), total + row[token]
      if token == EOS or len(seq) == max_len:
        hypotheses.append((score / _penalty(len(seq), alpha), seq, len(seq)))
      else:
        extend(prefix + (token,), score)

  extend((first,), 0.0)
  return sorted(hypotheses, key=lambda h: -h[0])


def _reference_beam(logp, first, beam_size, max_len, alpha):
  """Plain beam search run to max_len: every EOS extension finishes, K best others live on."""
  alive, finished = [((first,), 0.0)], []
  for step in range(max_len):
    extensions = [(prefix + (t,), total + logp(prefix)[t])
                  for prefix, total in alive for t in range(VOCAB)]
    finished += [(total / _penalty(step + 1, alpha), prefix[1:], step + 1)
                 for prefix, total in extensions if prefix[-1] == EOS]
    alive = sorted([e for e in extensions if e[0][-1] != EOS], key=lambda e: -e[1])[:beam_size]
  finished += [(total / _penalty(max_len, alpha), prefix[1:], max_len)
               for prefix, total in alive]
  return sorted(finished, key=lambda h: -h[0])[:beam_size]


def _run_beam(step_fn, state, first, **kwargs):
  search = jax.jit(functools.partial(decoding.beam_search, step_fn, **kwargs))
  return jax.tree.map(np.asarray, search(state, jnp.asarray(first, jnp.int32)))


def _true_score(logp, first, tokens, length, alpha):
  """Penalised log-prob sum of the first ``length`` tokens after ``first``."""
  prefix = (first,) + tuple(int(t) for t in tokens[:length])
  total = sum(logp(prefix[:i + 1])[prefix[i + 1]] for i in range(length))
  return total / _penalty(length, alpha)


def _check(result, row, want, logp, first, alpha):
  """Row ``row`` of a BeamResult holds hypotheses scoring as ``want`` (score, tokens, length).

  Scores must match in order, and each returned hypothesis must be distinct and score its
  own tokens' true value: the same hypotheses as ``want`` up to exact ties in score, which
  the Markov model has (paths with the same transitions in another order).
  """
  np.testing.assert_allclose(result.scores[row], [score for score, _, _ in want],
                             rtol=1e-5, atol=1e-5)
  got = [tuple(seq[:length]) for seq, length in zip(result.tokens[row], result.lengths[row])]
  assert len(set(got)) == len(got)
  true = [_true_score(logp, first, seq, length, alpha)
          for seq, length in zip(result.tokens[row], result.lengths[row])]
  np.testing.assert_allclose(result.scores[row], true, rtol=1e-5, atol=1e-5)


def _check_well_formed(result):
  """EOS only as the last token, 0 (pad) after it, max_len tokens without one."""
  max_len = result.tokens.shape[-1]
  for seq, length in zip(result.tokens.reshape(-1, max_len), result.lengths.ravel()):
    assert 1 <= length <= max_len
    assert EOS not in seq[:length - 1]
    assert seq[length - 1] == EOS or length == max_len
    assert (seq[length:] == 0).all()


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
@pytest.mark.parametrize("model", ["markov", "history"])
def test_full_beam_finds_every_hypothesis_exactly(model, alpha):
  """A beam as large as the hypothesis count returns all of them, in brute-force order."""
  batch, max_len, first = 2, 4, [0, 3]
  step_fn, state, logp = (_markov_model(1, batch, eos_bias=0.5) if model == "markov" else
                          _history_model(2, batch, max_len, eos_bias=0.5))
  want = [_brute_force(functools.partial(logp, row), first[row], max_len, alpha)
          for row in range(batch)]
  beam_size = len(want[0])
  assert beam_size == 1 + 4 + 16 + 64 + 256
  result = _run_beam(step_fn, state, first, beam_size=beam_size, max_len=max_len,
                     eos_id=EOS, alpha=alpha)
  assert result.tokens.shape == (batch, beam_size, max_len)
  assert result.tokens.dtype == np.int32 and result.lengths.dtype == np.int32
  for row in range(batch):
    _check(result, row, want[row], functools.partial(logp, row), first[row], alpha)
  _check_well_formed(result)
  assert len(set(result.lengths.ravel())) == max_len  # every length occurs


@pytest.mark.parametrize("beam_size", [1, 2, 3])
@pytest.mark.parametrize("alpha", [0.0, 0.6])
@pytest.mark.parametrize("model", ["markov", "history"])
def test_small_beams_match_the_reference(model, alpha, beam_size):
  """Small beams (pruning, early stopping) match a Python beam search run to max_len."""
  batch, max_len, first = 3, 5, [0, 1, 4]
  step_fn, state, logp = (_markov_model(3, batch, eos_bias=1.0) if model == "markov" else
                          _history_model(4, batch, max_len, eos_bias=1.0))
  result = _run_beam(step_fn, state, first, beam_size=beam_size, max_len=max_len,
                     eos_id=EOS, alpha=alpha)
  for row in range(batch):
    row_logp = functools.partial(logp, row)
    want = _reference_beam(row_logp, first[row], beam_size, max_len, alpha)
    _check(result, row, want, row_logp, first[row], alpha)
  _check_well_formed(result)
  # A pruned beam never beats the optimum.
  exact = _brute_force(functools.partial(logp, 0), first[0], max_len, alpha)
  assert result.scores[0, 0] <= exact[0][0] + 1e-5


def test_batch_rows_are_independent():
  """Each row of a batch decodes as it does alone (per-row tables ride in the state)."""
  step_fn, state, _ = _history_model(5, 3, 4)
  kwargs = dict(beam_size=3, max_len=4, eos_id=EOS, alpha=0.6)
  full = _run_beam(step_fn, state, [0, 1, 4], **kwargs)
  for row, first in enumerate([0, 1, 4]):
    one = {"history": state["history"][row:row + 1], "step": state["step"],
           "table": state["table"][row:row + 1]}
    alone = _run_beam(step_fn, one, [first], **kwargs)
    for got, want in zip(full, alone):
      np.testing.assert_array_equal(got[row], want[0])


def _greedy(logp, first, max_len):
  """Argmax tokens until EOS or max_len."""
  prefix = (first,)
  for _ in range(max_len):
    prefix += (int(np.argmax(logp(prefix))),)
    if prefix[-1] == EOS:
      break
  return prefix[1:]


def test_beam_size_one_is_greedy_when_eos_is_argmax_or_unlikely():
  """K=1 follows the greedy path when EOS is either the argmax or far too unlikely to win.

  EOS is the argmax in some (row, last token) cells and has logit -12 elsewhere: a runner-up
  EOS costs about 12 nats, more than the rest of any greedy path (< 5 steps of <= log 4).
  """
  batch, max_len = 4, 5
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(batch, VOCAB, VOCAB))
  logits[..., EOS] = np.where(rng.random((batch, VOCAB)) < 0.3, 5.0, -12.0)
  table = _log_softmax(logits)
  state = {"table": jnp.asarray(table, jnp.float32)}
  first = [0, 1, 3, 4]
  result = _run_beam(_markov_step, state, first, beam_size=1, max_len=max_len, eos_id=EOS,
                     alpha=0.0)
  for row in range(batch):
    seq = _greedy(lambda prefix: table[row, prefix[-1]], first[row], max_len)
    assert result.lengths[row, 0] == len(seq)
    np.testing.assert_array_equal(result.tokens[row, 0, :len(seq)], seq)
  assert len(set(result.lengths[:, 0])) > 1  # some rows stop at EOS, some run to max_len


def test_beam_size_one_prefers_a_better_finished_hypothesis():
  """K=1 is not greedy: an early EOS (p 0.4) beats the greedy path (0.6 * 0.55 * 0.55)."""
  probs = np.full((VOCAB, VOCAB), 1e-6)
  probs[0, [1, EOS]] = [0.6, 0.4]
  probs[1, [1, 0]] = [0.55, 0.45]
  probs[[2, 3, 4], 0] = 1.0
  table = np.log(probs / probs.sum(-1, keepdims=True))[None]
  state = {"table": jnp.asarray(table, jnp.float32)}
  assert _greedy(lambda prefix: table[0, prefix[-1]], 0, 3) == (1, 1, 1)
  result = _run_beam(_markov_step, state, [0], beam_size=1, max_len=3, eos_id=EOS, alpha=0.0)
  np.testing.assert_array_equal(result.tokens[0, 0], [EOS, 0, 0])
  assert result.lengths[0, 0] == 1
  np.testing.assert_allclose(result.scores[0, 0], np.log(0.4), rtol=1e-5)


def test_fewer_hypotheses_than_beams_pad_with_minus_inf():
  """With max_len 1 there are VOCAB hypotheses; the other beams score -inf."""
  step_fn, state, logp = _markov_model(7, 1)
  result = _run_beam(step_fn, state, [0], beam_size=VOCAB + 2, max_len=1, eos_id=EOS,
                     alpha=0.6)
  row_logp = functools.partial(logp, 0)
  _check(jax.tree.map(lambda x: x[:, :VOCAB], result), 0, _brute_force(row_logp, 0, 1, 0.6),
         row_logp, 0, 0.6)
  assert (result.scores[0, VOCAB:] == -np.inf).all()


def test_early_stop_waits_for_the_length_penalty():
  """An alive beam below the finished one now can still win at max_len with alpha > 0.

  EOS first scores log 0.7; the other branch pays log 0.3 once and then continues for free:
  log 0.3 / length_penalty(8, 2) > log 0.7, though log 0.3 / length_penalty(2, 2) is not.
  """
  probs = np.full((VOCAB, VOCAB), 1e-6)
  probs[0, [EOS, 1]] = [0.7, 0.3]
  probs[1, 1] = 1.0
  probs[[2, 3, 4], 0] = 1.0
  table = np.log(probs / probs.sum(-1, keepdims=True))[None]
  state = {"table": jnp.asarray(table, jnp.float32)}
  max_len, alpha = 8, 2.0
  result = _run_beam(_markov_step, state, [0], beam_size=1, max_len=max_len, eos_id=EOS,
                     alpha=alpha)
  row_logp = lambda prefix: table[0, prefix[-1]]
  want = _brute_force(row_logp, 0, max_len, alpha)[:1]
  assert want[0][1] == (1,) * max_len
  _check(result, 0, want, row_logp, 0, alpha)


def test_early_stop_skips_hopeless_steps():
  """Once every row's K finished beams outscore any alive one, no more steps run."""
  batch, max_len, alpha = 2, 10, 0.6
  _, state, logp = _markov_model(9, batch, eos_bias=4.0)
  calls = []

  def counted_step(tokens, state):
    jax.debug.callback(lambda t: calls.append(t), tokens)
    return _markov_step(tokens, state)

  result = _run_beam(counted_step, state, [0, 3], beam_size=2, max_len=max_len, eos_id=EOS,
                     alpha=alpha)
  assert 1 < len(calls) < max_len
  for row, first in enumerate([0, 3]):
    row_logp = functools.partial(logp, row)
    _check(result, row, _reference_beam(row_logp, first, 2, max_len, alpha), row_logp, first,
           alpha)
