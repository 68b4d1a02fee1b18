"""Generation through the K/V cache along depth, against full recomputation.

Every check decodes with the cache and compares with the model's ordinary forward pass
over the whole sequence (no cache): the logits each generated token was chosen from must
match to 1e-5 in float32, for every sharing order, M = 1 and M > 1, GQA / MQA, every K/V
sharing policy, left-padded batched prompts, and both generating families.
"""

import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers import tiny
from xlps import decoding, generate, models
from xlps.models import transformer

NEW = 5
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [3, 4, 5, 6]]   # padded on the left to 6


def lm(num_layers=4, **overrides):
  return models.spec_of(tiny("decoder_lm", num_layers, max_len=16, **overrides))


def params_of(spec, seed=0):
  # Larger-than-init weights so the logits are far from uniform and errors would show.
  return jax.tree.map(lambda p: p * 4.0, nn.unbox(models.init_params(spec, seed)))


def lm_reference(spec, params, prompts, generated):
  """Per row, the logits that predict each generated token, from one forward pass over the
  rows ``prompt + generated`` starting at position 0 (padded on the right, which a causal
  model never reads), without a cache."""
  generated = np.asarray(generated)
  width = max(map(len, prompts)) + generated.shape[1]
  seqs = np.zeros((len(prompts), width), np.int32)
  for row, prompt in enumerate(prompts):
    seqs[row, :len(prompt) + generated.shape[1]] = list(prompt) + list(generated[row])
  logits = models.build(spec).apply({"params": params}, {"inputs": jnp.asarray(seqs)})
  return jnp.stack([logits[row, len(p) - 1:len(p) - 1 + generated.shape[1]]
                    for row, p in enumerate(prompts)])


LM_CASES = {
    "tied": {},
    "sequence_m2_gqa": dict(num_kv_heads=2, sharing={"num_unique": 2, "order": "sequence"}),
    "cycle_m2_mqa": dict(num_kv_heads=1, sharing={"num_unique": 2, "order": "cycle"}),
    "cycle_rev_m3": dict(num_layers=6, sharing={"num_unique": 3, "order": "cycle_rev"}),
    "table_per_component": dict(sharing={"order": "table", "table": "0 1 1 2", "num_unique": 0,
                                         "mlp": {"num_unique": 4, "order": "sequence"}}),
    "cross_layer_gqa": dict(num_kv_heads=2, kv_sharing={"policy": "cross_layer",
                                                        "group_size": 2}),
    "cross_layer_uneven": dict(num_layers=5, kv_sharing={"policy": "cross_layer",
                                                         "group_size": 2}),
    "recursive_cycle": dict(num_layers=6, sharing={"num_unique": 2, "order": "cycle"},
                            kv_sharing={"policy": "recursive"}),
    "kv_table": dict(num_layers=6, kv_sharing={"policy": "table", "table": "0 1 2 2 2 2"}),
    "unrolled": dict(scan_layers=False, sharing={"num_unique": 2},
                     kv_sharing={"policy": "cross_layer", "group_size": 2}),
    "two_level_remat": dict(remat_policy="full", remat_group_size=2,
                            kv_sharing={"policy": "cross_layer", "group_size": 3},
                            num_layers=6),
}


@pytest.mark.parametrize("case", sorted(LM_CASES))
def test_lm_cached_decoding_equals_full_recomputation(case):
  overrides = dict(LM_CASES[case])
  spec = lm(overrides.pop("num_layers", 4), **overrides)
  params = params_of(spec)
  out = generate.LMGenerator(spec, NEW, generate.Sampling(temperature=1.0, seed=1), eos_id=-1,
                             return_logits=True)(params, PROMPTS)
  assert out.tokens.shape == (len(PROMPTS), NEW)
  np.testing.assert_array_equal(out.lengths, NEW)
  want = lm_reference(spec, params, PROMPTS, out.tokens)
  np.testing.assert_allclose(out.logits, want, atol=1e-5, rtol=1e-5)


def test_lm_sampling_is_deterministic_and_eos_stops_rows():
  spec = lm(sharing={"num_unique": 2})
  params = params_of(spec)
  sample = lambda seed, eos=-1: generate.LMGenerator(  # noqa: E731
      spec, NEW, generate.Sampling(temperature=1.0, top_k=8, top_p=0.9, seed=seed),
      eos_id=eos)(params, PROMPTS)
  a, b, c = sample(3), sample(3), sample(4)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  # Row 1 stops at its first sampled token when that is EOS: PAD after it, length 1.
  eos = int(a.tokens[1, 0])
  stopped = sample(3, eos)
  assert int(stopped.lengths[1]) == 1 and np.all(np.asarray(stopped.tokens[1, 1:]) == 0)
  for row in (0, 2):
    tokens = list(np.asarray(a.tokens[row]))
    length = tokens.index(eos) + 1 if eos in tokens else NEW
    assert int(stopped.lengths[row]) == length
    np.testing.assert_array_equal(stopped.tokens[row, :length], a.tokens[row, :length])


def test_greedy_equals_argmax_of_the_reference():
  spec = lm(num_kv_heads=2)
  params = params_of(spec)
  out = generate.LMGenerator(spec, NEW, eos_id=-1, return_logits=True)(params, PROMPTS)
  want = lm_reference(spec, params, PROMPTS, out.tokens)
  np.testing.assert_array_equal(out.tokens, np.argmax(want, -1))


def seq2seq(**overrides):
  return models.spec_of(tiny("encoder_decoder", overrides.pop("num_layers", 3), max_len=16,
                             **overrides))


SOURCES = [[5, 6, 7, 8, 9], [11, 12], [3, 4, 5, 6, 7]]
S2S_CASES = {
    "untied": {},
    "tied_m2_gqa": dict(tie_encoder_decoder=True, num_kv_heads=2, num_layers=4,
                        sharing={"num_unique": 2, "order": "cycle"}),
    "cross_slots_recursive": dict(num_layers=6, sharing={"num_unique": 2, "order": "cycle",
                                                         "cross_attention": {"num_unique": 3}},
                                  kv_sharing={"policy": "recursive"}),
    "cross_layer_mqa": dict(num_kv_heads=1, num_decoder_layers=4,
                            kv_sharing={"policy": "cross_layer", "group_size": 2}),
}


def seq2seq_reference(spec, params, sources, tokens):
  """Teacher-forced logits of ``tokens`` (start token 0 then tokens[:-1]), no cache."""
  padded = np.zeros((len(sources), max(map(len, sources))), np.int32)
  for row, source in enumerate(sources):
    padded[row, :len(source)] = source
  return models.build(spec).apply({"params": params},
                                  {"inputs": jnp.asarray(padded), "targets": tokens})


@pytest.mark.parametrize("case", sorted(S2S_CASES))
def test_seq2seq_cached_decoding_equals_full_recomputation(case):
  spec = seq2seq(**S2S_CASES[case])
  params = params_of(spec)
  out = generate.Seq2SeqGenerator(spec, NEW, sampling=generate.Sampling(temperature=1.0),
                                  eos_id=-1, return_logits=True)(params, SOURCES)
  want = seq2seq_reference(spec, params, SOURCES, out.tokens)
  np.testing.assert_allclose(out.logits, want, atol=1e-5, rtol=1e-5)


def test_beam_search_scores_match_full_recomputation():
  spec = seq2seq(num_kv_heads=2)
  params = params_of(spec)
  alpha = 0.6
  greedy = generate.Seq2SeqGenerator(spec, NEW, eos_id=-1)(params, SOURCES)
  # EOS = a token the model likes, so some beams finish early.
  eos = int(np.bincount(np.asarray(greedy.tokens).ravel()).argmax())
  out = generate.Seq2SeqGenerator(spec, NEW, beam_size=4, alpha=alpha, eos_id=eos)(params,
                                                                                    SOURCES)
  log_probs = jax.nn.log_softmax(seq2seq_reference(spec, params, SOURCES, out.tokens))
  for row in range(len(SOURCES)):
    n = int(out.lengths[row])
    tokens = np.asarray(out.tokens[row])
    assert np.all(tokens[n:] == 0) and (n == NEW or tokens[n - 1] == eos)
    total = sum(float(log_probs[row, t, tokens[t]]) for t in range(n))
    want = total / float(decoding.length_penalty(jnp.float32(n), alpha))
    np.testing.assert_allclose(float(out.scores[row]), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- K/V sharing as a model


def train_a_little(spec, steps=3):
  """A few AdamW steps on random sequences: parameters a K/V policy was trained with."""
  module = models.build(spec)
  params = nn.unbox(models.init_params(spec))
  batch = models.example_batch(spec, 4, 12, seed=5)
  opt = optax.adamw(3e-2)
  state = opt.init(params)

  def loss(p):
    logits = module.apply({"params": p}, batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                           batch["inputs"][:, 1:]).mean()

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, grads

  for _ in range(steps):
    params, state, grads = step(params, state)
  return params, grads


@pytest.mark.parametrize("kv", [{"policy": "cross_layer", "group_size": 2},
                                {"policy": "recursive"}], ids=["cross_layer", "recursive"])
def test_trained_with_kv_sharing_decodes_equal_to_itself(kv):
  spec = lm(6, num_kv_heads=2, sharing={"num_unique": 3, "order": "cycle"}, kv_sharing=kv)
  params, _ = train_a_little(spec)
  out = generate.LMGenerator(spec, NEW, eos_id=-1, return_logits=True)(params, PROMPTS)
  np.testing.assert_allclose(out.logits, lm_reference(spec, params, PROMPTS, out.tokens),
                             atol=1e-5, rtol=1e-5)


def test_cross_layer_reads_the_group_leaders_kv():
  """CLA with M = N: only each group's first layer's key / value projections matter."""
  spec = lm(4, sharing={"num_unique": 4, "order": "sequence"},
            kv_sharing={"policy": "cross_layer", "group_size": 2})
  _, grads = train_a_little(spec, steps=1)
  attention = grads["decoder"]["layers"]["attention"]
  for name in ("key", "value"):
    per_slot = np.abs(np.asarray(attention[name]["kernel"])).sum(axis=(1, 2, 3))
    assert np.all(per_slot[[0, 2]] > 0) and np.all(per_slot[[1, 3]] == 0), per_slot
  assert np.all(np.abs(np.asarray(attention["query"]["kernel"])).sum(axis=(1, 2, 3)) > 0)


@pytest.mark.parametrize("a,b", [
    (dict(kv_sharing={"policy": "cross_layer", "group_size": 1}), {}),
    (dict(kv_sharing={"policy": "recursive"}),
     dict(kv_sharing={"policy": "cross_layer", "group_size": 4})),
    (dict(sharing={"num_unique": 2, "order": "sequence"}, kv_sharing={"policy": "recursive"}),
     dict(sharing={"num_unique": 2, "order": "sequence"},
          kv_sharing={"policy": "cross_layer", "group_size": 2})),
    (dict(kv_sharing={"policy": "table", "table": "0 0 1 1"}),
     dict(kv_sharing={"policy": "cross_layer", "group_size": 2})),
], ids=["cla1_is_per_layer", "tied_recursive_is_one_group", "sequence_recursive_is_cla2",
        "table_is_cla2"])
def test_equivalent_kv_plans_give_equal_models(a, b):
  """Policies that name the same K/V table train the same model (forward and gradients)."""
  results = []
  for overrides in (a, b):
    spec = lm(4, **overrides)
    params = nn.unbox(models.init_params(spec))
    batch = models.example_batch(spec, 2, 8)
    f = lambda p: models.build(spec).apply({"params": p}, batch)  # noqa: E731
    results.append(jax.jit(lambda p: (f(p), jax.grad(lambda q: f(q).sum())(p)))(params))
  np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-6)
  for x, y in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(x, y, atol=1e-5)


def test_kv_sharing_scan_equals_unrolled_with_gradients():
  grads = []
  for scan in (True, False):
    spec = lm(6, sharing={"num_unique": 2, "order": "cycle"}, scan_layers=scan,
              kv_sharing={"policy": "recursive"})
    params = nn.unbox(models.init_params(spec))
    batch = models.example_batch(spec, 2, 8)
    loss = lambda p: models.build(spec).apply({"params": p}, batch).std()  # noqa: E731
    grads.append(jax.jit(jax.grad(loss))(params))
  for x, y in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(x, y, atol=1e-6)


# ----------------------------------------------------------------------- cache bytes


@pytest.mark.parametrize("family,overrides", [
    ("decoder_lm", {}),
    ("decoder_lm", dict(num_kv_heads=2, kv_sharing={"policy": "cross_layer", "group_size": 2})),
    ("decoder_lm", dict(num_kv_heads=1, num_layers=6, sharing={"num_unique": 3},
                        kv_sharing={"policy": "recursive"})),
    ("decoder_lm", dict(dtype="bfloat16", kv_sharing={"policy": "table", "table": "0 1 1 1"})),
    ("encoder_decoder", dict(num_kv_heads=2, sharing={"num_unique": 2,
                                                      "cross_attention": {"num_unique": 4}},
                             kv_sharing={"policy": "recursive"})),
], ids=["per_layer", "cross_layer", "recursive", "table_bf16", "encoder_decoder"])
def test_cache_bytes_per_token_equal_the_formula(family, overrides):
  spec = models.spec_of(tiny(family, overrides.pop("num_layers", 4), max_len=16, **overrides))
  batch, length, source = 3, 10, 7
  cache = transformer.init_cache(spec, batch, length, source if family == "encoder_decoder" else 0)
  self_bytes = sum(cache["decoder"][k].nbytes for k in ("k", "v")) + cache["valid"].nbytes
  summary = models.summarize(spec)["kv_cache"]
  assert self_bytes == summary["bytes_per_token"] * batch * length
  if family == "encoder_decoder":
    cross = sum(cache["decoder"][k].nbytes for k in ("cross_k", "cross_v"))
    cross += cache["source_valid"].nbytes
    assert cross == summary["cross_bytes_per_source_token"] * batch * source


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kv,needles", [
    ({"policy": "clx"}, ["model.kv_sharing.policy='clx'", "per_layer, cross_layer, recursive"]),
    ({"policy": "cross_layer"}, ["model.kv_sharing.group_size=0", ">= 1"]),
    ({"policy": "per_layer", "group_size": 2}, ["model.kv_sharing.group_size=2",
                                                "policy='cross_layer'"]),
    ({"policy": "table", "table": "0 1 1"}, ["model.kv_sharing.table", "3 entries",
                                            "num_layers=4"]),
    ({"policy": "table", "table": "1 0 0 0"}, ["model.kv_sharing.table", "first use"]),
    ({"policy": "recursive", "table": "0 0 1 1"}, ["model.kv_sharing.table='0 0 1 1'",
                                                   "policy='table'"]),
])
def test_bad_kv_sharing_names_the_field(kv, needles):
  with pytest.raises(ValueError) as err:
    lm(4, kv_sharing=kv)
  for needle in needles:
    assert needle in str(err.value), (needle, str(err.value))


def test_unknown_kv_sharing_key_is_named():
  from xlps import config as config_lib
  m = tiny()
  with m.unlocked():
    m.kv_sharing.grup_size = 2
  with pytest.raises(ValueError, match=r"model\.kv_sharing\.grup_size is not a kv_sharing key; "
                     r"did you mean group_size\?"):
    models.spec_of(m)
  with pytest.raises(ValueError, match=r"model\.kv_sharing\.polcy"):
    config_lib.check_override("model.kv_sharing.polcy", "recursive")


def test_bad_generation_requests():
  spec = lm()
  with pytest.raises(ValueError, match=r"max_new_tokens=12 .*18 positions.*max_len=16"):
    generate.LMGenerator(spec, 12).start(PROMPTS)
  with pytest.raises(ValueError, match="at least one token"):
    generate.left_pad([[1, 2], []])
  with pytest.raises(ValueError, match=r"top_p=0 must be in \(0, 1\]"):
    generate.Sampling(top_p=0)
  with pytest.raises(ValueError, match=r"family='encoder_mlm' does not generate"):
    transformer.init_cache(models.spec_of(tiny("encoder_mlm")), 1, 4)
  with pytest.raises(ValueError, match="Seq2SeqGenerator"):
    generate.LMGenerator(seq2seq(), 4)


# ------------------------------------------------------------------- launch.generate


@pytest.mark.slow
def test_launch_generate_prompts_eval_split_and_errors(tmp_path, data_dir):
  """The CLI on a step-0 checkpoint: its greedy continuation is the library's, the eval
  split is scored, a workdir without checkpoints is one error line."""
  from configs import default
  from tests.helpers import run_command
  from xlps import interop
  from xlps.data.tokenizers import BOS, ByteTokenizer
  config = default.get_config("runlocal")
  config.model.update(num_layers=3, max_len=64)
  config.model.kv_sharing.update(policy="cross_layer", group_size=2)
  config.data.update(name="algorithmic", task="copy", train_max_len=4, test_max_len=6,
                     num_train_examples=64, num_eval_examples=16, data_dir=str(data_dir),
                     seq_len=16)
  spec = models.spec_of(config)
  params = params_of(spec)
  workdir = tmp_path / "w"
  interop.write_checkpoint(config, params, workdir)
  base = ["-m", "launch.generate", f"--workdir={workdir}"]

  out = run_command([sys.executable, *base, "--prompt=def f(", "--max_new_tokens=12"])
  assert out.returncode == 0, out.stderr
  tok = ByteTokenizer()
  want = generate.LMGenerator(spec, 12)(params, [[BOS, *tok.encode("def f(").tolist()]])
  text = tok.decode(np.asarray(want.tokens[0, :int(want.lengths[0])])).decode("utf-8", "replace")
  assert f"--- prompt: 'def f('\ndef f({text}\n" in out.stdout, out.stdout
  assert "cross_layer (2 entries" in out.stdout and "decode_tokens_per_sec" in out.stdout

  out = run_command([sys.executable, *base, "--eval_split=test", "--num_examples=6",
                     "--batch_size=4"])
  assert out.returncode == 0, out.stderr
  assert re.search(r"test: exact-sequence accuracy \d\.\d{4} \(\d/6\)", out.stdout), out.stdout

  out = run_command([sys.executable, "-m", "launch.generate", f"--workdir={tmp_path / 'none'}",
                     "--prompt=x"])
  assert out.returncode == 2 and out.stderr.startswith("error: --workdir="), out.stderr


@pytest.mark.slow
def test_launch_generate_bad_requests_are_one_line(tmp_path, data_dir):
  """issue 23 item 7: each of these was a traceback (or, for a missing workdir, created
  WORKDIR/checkpoints); the default --max_new_tokens fits a model with max_len 32."""
  from configs import default
  from tests.helpers import run_command
  from xlps import interop
  config = default.get_config("runlocal")
  config.model.update(num_layers=4, max_len=32)
  config.data.update(data_dir=str(data_dir), seq_len=32)
  lm = tmp_path / "lm"
  interop.write_checkpoint(config, params_of(models.spec_of(config)), lm)
  config.model.loop.update(prelude=1, core=1, coda=1)  # 2 core iterations
  config.model.lora.rank = 2
  looped = tmp_path / "looped_lora"
  interop.write_checkpoint(config, params_of(models.spec_of(config)), looped)

  def error(workdir, *flags):
    out = run_command([sys.executable, "-m", "launch.generate", f"--workdir={workdir}", *flags])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return out.stderr.strip().splitlines()[-1]
  assert error(lm, b"--prompt=caf\xe9".decode("utf-8", "surrogateescape")) == (
      r"error: --prompt=b'caf\xe9' is not UTF-8 text; valid: a UTF-8 prompt")
  assert error(lm, "--eval_split=validation").startswith(
      "error: --eval_split='validation' scores exact-sequence accuracy on source/target "
      "examples, and this run's data holds documents; valid: --prompt for a language model")
  assert error(lm, "--eval_split=test_long") == (
      "error: --eval_split='test_long' is not an eval split of this run's data; valid: "
      "validation")
  assert error(lm, "--eval_split=validation", "--batch_size=0") == (
      "error: --batch_size=0 must be an integer >= 1")
  assert error(looped, "--prompt=x", "--iterations=3") == (
      "error: --iterations=3 exceeds the 2 core iterations this checkpoint was trained with, "
      "and its per-applied-layer LoRA adapters (model.lora.rank=2) exist only for those; "
      "valid: --iterations 1..2")
  assert error(tmp_path / "none", "--prompt=x").startswith(
      "error: --workdir='{}' holds no checkpoints".format(tmp_path / "none"))
  assert not (tmp_path / "none").exists()
  out = run_command([sys.executable, "-m", "launch.generate", f"--workdir={looped}",
                     "--prompt=x", "--iterations=1"])
  assert out.returncode == 0 and "1 of 2 core iterations" in out.stdout, out.stderr[-3000:]
  out = run_command([sys.executable, "-m", "launch.generate", f"--workdir={lm}", "--prompt=abc"])
  assert out.returncode == 0 and "--- prompt: 'abc'" in out.stdout, out.stderr[-3000:]
