"""Generates from a trained workdir: completes prompts or scores exact-sequence accuracy.

    # complete Python prompts with the README's default model (greedy; byte tokenizer)
    python -m launch.generate --workdir=workdir/default --prompt='def __init__(self' \
        --prompt='import ' --max_new_tokens=64
    # sample instead: --temperature=0.8 --top_k=40 --top_p=0.95 --seed=1
    # exact-sequence accuracy of a trained algorithmic model on a test split
    python -m launch.generate --workdir=/tmp/ut_reverse --eval_split=test_long --beam_size=4
    # a looped model at another depth than its eval default (up to its maximum)
    python -m launch.generate --workdir=/tmp/looped --prompt='def f(' --iterations=8

The model and its config come from the latest checkpoint of WORKDIR (its stored config;
``--step`` picks another), the tokenizer from ``WORKDIR/tokenizer`` where the run kept one
(else the config's: byte for the README's runs and for runs from before it was kept). Decoding uses the K/V cache along applied depth
(``xlps.generate``). Prefill and per-token decode speeds are measured on a second run of
the same batch, after compilation, and printed with the compile times.
"""

import os
import sys
import time

from absl import app, flags, logging

from xlps import config as config_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir whose checkpoint generates.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Text to continue (decoder LM) or to "
                                    "transduce (encoder-decoder); repeat for a batch.")
_EVAL_SPLIT = flags.DEFINE_string("eval_split", None, "Seq2seq eval split (e.g. test, "
                                  "test_long) to score by exact-sequence accuracy.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 256, "Examples of --eval_split (0 = all).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Rows per generation batch (eval).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 0, "Tokens to generate; 0 = up to 128 for "
                                "prompts (as many as fit in model.max_len after the longest "
                                "one), the longest target + 1 for --eval_split.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; else sample.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BEAM = flags.DEFINE_integer("beam_size", 1, "Encoder-decoder beam search width (1 = greedy "
                             "or sampling).")
_ALPHA = flags.DEFINE_float("alpha", 0.6, "Beam search length penalty exponent.")
_ITERATIONS = flags.DEFINE_integer("iterations", 0, "Looped models: core iterations to run, "
                                   "also beyond the trained maximum (0 = the checkpoint's "
                                   "model.loop.eval_iterations).")
_EXIT = flags.DEFINE_float("exit_threshold", None, "Looped models: early-exit threshold "
                           "(default: the checkpoint's model.loop.exit_threshold).")


def _timed(fn, *args):
  import jax
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def lm_generate(generator, params, prompts):
  """Runs the LM generator twice on ``prompts`` (compile, then timed): (output, timings)."""
  batch, cache = generator.start(prompts)
  timings = {}
  for run in ("compile", "timed"):
    (logits, filled), prefill_s = _timed(generator.prefill, params, batch, cache)
    out, decode_s = _timed(generator.decode, params, logits, filled, batch["lengths"])
    timings[run] = (prefill_s, decode_s)
  prefill_s, decode_s = timings["timed"]
  generated = int(out.lengths.sum())
  return out, {
      "prefill_tokens_per_sec": int(batch["lengths"].sum()) / prefill_s,
      "decode_tokens_per_sec": generated / decode_s,
      "decode_ms_per_step": 1e3 * decode_s / max(int(out.lengths.max()), 1),
      "prefill_compile_s": timings["compile"][0] - prefill_s,
      "decode_compile_s": timings["compile"][1] - decode_s,
  }


def seq2seq_generate(generator, params, sources):
  """Runs the seq2seq generator twice (compile, then timed): (output, timings)."""
  first, compile_s = _timed(generator, params, sources)
  out, run_s = _timed(generator, params, sources)
  return out, {"output_tokens_per_sec": int(out.lengths.sum()) / run_s,
               "compile_s": compile_s - run_s}


def _text(tokenizer, tokens) -> str:
  return tokenizer.decode(tokens).decode("utf-8", errors="replace")


def _print_timings(timings: dict) -> None:
  print("speed: " + ", ".join(f"{k} {v:,.1f}" if "per_sec" in k else f"{k} {v:.2f}"
                              for k, v in timings.items()))


def complete(spec, params, tokenizer, prompts: list[str], max_new: int, sampling) -> None:
  import numpy as np
  from xlps import generate
  if spec.family == "decoder_lm":
    ids = [[tokenizer.bos_id, *tokenizer.encode(p).tolist()] for p in prompts]
    room = spec.max_len - max(map(len, ids)) if spec.position_embedding != "none" else 128
    max_new = max_new or max(min(128, room), 1)  # too long a prompt: generate's own error
    gen = generate.LMGenerator(spec, max_new, sampling, eos_id=tokenizer.eos_id)
    out, timings = lm_generate(gen, params, ids)
  else:
    max_new = max_new or (min(128, spec.max_len) if spec.position_embedding != "none" else 128)
    gen = generate.Seq2SeqGenerator(spec, max_new, _BEAM.value, _ALPHA.value, sampling,
                                    eos_id=tokenizer.eos_id)
    ids = [tokenizer.encode(p).tolist() for p in prompts]
    out, timings = seq2seq_generate(gen, params, ids)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  for prompt, row, n in zip(prompts, tokens, lengths):
    print(f"--- prompt: {prompt!r}")
    print(prompt + _text(tokenizer, row[:n]) if spec.family == "decoder_lm"
          else _text(tokenizer, row[:n]))
  _print_timings(timings)


def exact_accuracy(spec, params, pipeline, split: str, limit: int, batch_size: int,
                   max_new: int, sampling) -> None:
  """Exact-sequence accuracy of generated outputs (up to EOS) against ``split``'s targets."""
  import numpy as np
  from xlps import generate
  from xlps.data import tokenizers
  if split not in pipeline.eval_splits:
    raise config_lib.ConfigError(f"--eval_split={split!r} is not an eval split of this run's "
                                 f"data; valid: {', '.join(pipeline.eval_splits)}")
  records = pipeline.eval_records(split)
  if records and not all(key in records[0] for key in ("source", "target")):
    raise config_lib.ConfigError(
        f"--eval_split={split!r} scores exact-sequence accuracy on source/target examples, and "
        "this run's data holds documents; valid: --prompt for a language model, --eval_split "
        "for a run on a seq2seq dataset (data.name='algorithmic')")
  n = len(records) if limit <= 0 else min(limit, len(records))
  encode = pipeline.tokenizer.encode
  pairs = [(encode(records[i]["source"]).tolist(),
            encode(records[i]["target"]).tolist() + [tokenizers.EOS]) for i in range(n)]
  max_new = max_new or max(len(t) for _, t in pairs) + 1
  if spec.family == "decoder_lm":  # the lm layout: source EOS target EOS
    prompts = [s + [tokenizers.EOS] for s, _ in pairs]
    gen = generate.LMGenerator(spec, max_new, sampling)
    run = lambda rows: lm_generate(gen, params, rows)  # noqa: E731
  else:
    width = max(len(s) for s, _ in pairs)
    prompts = [s + [0] * (width - len(s)) for s, _ in pairs]
    gen = generate.Seq2SeqGenerator(spec, max_new, _BEAM.value, _ALPHA.value, sampling)
    run = lambda rows: seq2seq_generate(gen, params, np.asarray(rows, np.int32))  # noqa: E731
  correct, timings = 0, {}
  for lo in range(0, n, batch_size):
    rows = prompts[lo:lo + batch_size]
    rows += [rows[-1]] * (batch_size - len(rows))  # one batch shape: one compile
    out, timings = run(rows) if not timings else (run(rows)[0], timings)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for row in range(min(batch_size, n - lo)):
      correct += tokens[row, :lengths[row]].tolist() == pairs[lo + row][1]
  print(f"{split}: exact-sequence accuracy {correct / n:.4f} ({correct}/{n}), max "
        f"{max_new} new tokens, beam {_BEAM.value}, temperature {_TEMPERATURE.value}")
  _print_timings(timings)


def check_flags() -> None:
  """ConfigError for a flag value that cannot work, before anything is read."""
  for flag, low in ((_BATCH_SIZE, 1), (_MAX_NEW, 0), (_NUM_EXAMPLES, 0)):
    if flag.value < low:
      raise config_lib.ConfigError(f"--{flag.name}={flag.value} must be an integer >= {low}")
  for prompt in _PROMPT.value:
    try:
      prompt.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
      raise config_lib.ConfigError(f"--prompt={os.fsencode(prompt)!r} is not UTF-8 text; "
                                   "valid: a UTF-8 prompt") from None


def deeper(config, iterations: int) -> None:
  """Sets ``config``'s looped model to run ``iterations`` core iterations at evaluation, also
  beyond its trained maximum (more applied layers of the same shared core); refused where
  parameters are stacked along applied depth (LoRA) or per iteration (routers)."""
  lp = config.model.loop
  if not lp.core:
    raise config_lib.ConfigError(f"--iterations={iterations} needs a looped model "
                                 "(model.loop.core > 0); this checkpoint's has none")
  trained = (config.model.num_layers - lp.prelude - lp.coda) // lp.core
  per_depth = [what for what, on in (
      (f"per-applied-layer LoRA adapters (model.lora.rank={config.model.lora.rank})",
       config.model.lora.rank > 0),
      (f"per-iteration routers (model.routing.kind={config.model.routing.kind!r})",
       config.model.routing.kind != "none")) if on]
  if iterations > trained and per_depth:
    raise config_lib.ConfigError(
        f"--iterations={iterations} exceeds the {trained} core iterations this checkpoint "
        f"was trained with, and its {' and '.join(per_depth)} exist only for those; valid: "
        f"--iterations 1..{trained}")
  config.model.num_layers = max(config.model.num_layers,
                                lp.prelude + lp.core * iterations + lp.coda)
  lp.eval_iterations = iterations


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_PROMPT.value) == bool(_EVAL_SPLIT.value):
    raise app.UsageError("give --prompt (one or more) or --eval_split, not both")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
  from xlps import data, generate, interop, models, train
  try:
    check_flags()
    sampling = generate.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _SEED.value)
    checkpoints = train.workdir_path(_WORKDIR.value) / "checkpoints"
    if not checkpoints.is_dir():  # reading through Orbax would create it
      raise config_lib.ConfigError(f"--workdir={_WORKDIR.value!r} holds no checkpoints "
                                   f"({os.fspath(checkpoints)} does not exist); valid: the "
                                   "--workdir of a training run")
    try:
      config, params, step = interop.read_checkpoint(_WORKDIR.value, _STEP.value)
    except (ValueError, FileNotFoundError) as e:
      raise config_lib.ConfigError(f"--workdir={_WORKDIR.value!r}: {e}") from None
    if _ITERATIONS.value:
      deeper(config, _ITERATIONS.value)
    if _EXIT.value is not None:
      config.model.loop.exit_threshold = _EXIT.value
    spec = models.spec_of(config)
    cache = models.kv_cache_bytes(spec)
    if cache is None:
      raise config_lib.ConfigError(f"{_WORKDIR.value} holds a {spec.family} model, which does "
                                   "not generate; launch.generate needs decoder_lm or "
                                   "encoder_decoder")
    loop = (f", {spec.loop.eval_iterations} of {spec.loop.max_iterations} core iterations"
            if spec.loop else "")
    print(f"{_WORKDIR.value}: step {step}, {spec.family}, N={spec.num_layers}{loop}, "
          f"K/V cache {cache['policy']} ({cache['entries']} entries, "
          f"{cache['bytes_per_token']:,} bytes/token)")
    if _EVAL_SPLIT.value:
      pipeline = data.build(config, tokenizer=data.run_tokenizer(config, _WORKDIR.value))
      exact_accuracy(spec, params, pipeline, _EVAL_SPLIT.value, _NUM_EXAMPLES.value,
                     _BATCH_SIZE.value, _MAX_NEW.value, sampling)
    else:
      tokenizer = (data.run_tokenizer(config, _WORKDIR.value)
                   or data.build(config).tokenizer)  # sentencepiece kept nowhere: rebuilt
      complete(spec, params, tokenizer, _PROMPT.value, _MAX_NEW.value, sampling)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
