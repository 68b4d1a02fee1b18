"""Decode through the K/V cache: compile time vs. applied depth N, tokens/s, cache bytes.

The default model (``configs/default.py``: weight-tied decoder_lm, d_model 128, 4 heads,
SwiGLU, RMSNorm, max_len 128, M=1) with random parameters (``models.init_params``) and
random prompts (tokens in [4, 260)):

* Table A (compile time vs. N): for N = ``--depths`` with the scanned engine, and the
  unrolled reference (``scan_layers=False``) up to ``--unrolled_max_depth``, trace+lower and
  compile seconds of (a) ``LMGenerator.prefill``, (b) ONE decode step, a jitted
  ``(params, token [B], cache, positions [B]) -> (logits [B, V], cache)`` that runs the
  model once on a 1-token chunk, and (c) the whole decode ``while_loop``
  (``LMGenerator.decode``); HLO lines of (b) and (c); then, with the same compiled
  programs, prefill tokens/s and the decode loop's time per step (greedy, ``eos_id=-1`` so
  every row generates all new tokens). The K/V cache is stacked along applied depth and
  carried by the engine's one ``nn.scan``, so the scanned compile times should be flat in N.
* Table B (speed of the default model, N=6): prefill and decode tokens/s at batch 1 and 8,
  median of ``--speed_runs`` timed runs after a warm-up, with the float32 matmul ceiling
  (1024x1024x1024) measured in the same process for context.
* Table C (decode cache bytes per token): every ``model.kv_sharing`` policy at N = 6 and 24,
  MHA (num_kv_heads 4) and MQA (1), from the formula (``models.kv_cache_bytes``) and from
  the buffers ``transformer.init_cache`` allocates (k, v and valid nbytes / (B x T)).

Every measurement runs in a fresh Python process (this script re-invoked with
``--child``, ``bench.harness.child``) with JAX's persistent compilation cache disabled;
each Table A point is repeated ``--repeats`` times (median, min-max).

The committed ``bench/decode.md`` was produced by (from the repository root):

    .venv/bin/python -m bench.decode --out=bench/decode.md

Quick run:

    .venv/bin/python -m bench.decode --depths=6,24 --repeats=1
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import flags

from bench import harness

_DEPTHS = flags.DEFINE_list("depths", ["6", "24", "96"], "Applied depths N of Table A.")
_UNROLLED_MAX_DEPTH = flags.DEFINE_integer(
    "unrolled_max_depth", 24, "Largest N for which the unrolled variant is measured.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Fresh-process repeats per Table A point.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Prompts per batch (Table A).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Generated tokens.")
_LOOP_RUNS = flags.DEFINE_integer(
    "loop_runs", 3, "Timed decode-loop / prefill runs per Table A process (after a warm-up).")
_SPEED_RUNS = flags.DEFINE_integer("speed_runs", 5, "Timed runs per Table B row.")
_CACHE_DEPTHS = flags.DEFINE_list("cache_depths", ["6", "24"], "Applied depths N of Table C.")
_OUT = flags.DEFINE_string("out", None, "Also write the markdown report here.")

# (label, scan_layers)
VARIANTS = (("scan", True), ("unrolled", False))

# Table C: (label, kv_sharing policy, group_size, sharing num_unique M, sharing order)
CACHE_POLICIES = (
    ("per_layer", "per_layer", 0, 1, "cycle"),
    ("cross_layer g=2", "cross_layer", 2, 1, "cycle"),
    ("cross_layer g=3", "cross_layer", 3, 1, "cycle"),
    ("recursive, M=1", "recursive", 0, 1, "cycle"),
    ("recursive, M=3 cycle", "recursive", 0, 3, "cycle"),
)


# --------------------------------------------------------------------------- child side


def _spec(num_layers: int, scan_layers: bool = True, num_kv_heads: int = 0,
          kv_policy: str = "per_layer", group_size: int = 0, num_unique: int = 1,
          order: str = "cycle"):
  from configs import default
  from xlps import config as C
  from xlps import models

  m = default.get_config().model
  m.num_layers = num_layers
  m.scan_layers = scan_layers
  m.num_kv_heads = num_kv_heads
  m.sharing.num_unique = num_unique
  m.sharing.order = order
  m.kv_sharing = C.kv_sharing_config(policy=kv_policy, group_size=group_size)
  return models.spec_of(m)


def _setup(spec, batch_size: int, prompt_len: int, new_tokens: int, seed: int = 0):
  """Random parameters, the generator and its padded batch + empty cache."""
  import flax.linen as nn
  import jax
  import numpy as np

  from xlps import generate, models

  params = jax.jit(lambda: nn.unbox(models.init_params(spec)))()
  gen = generate.LMGenerator(spec, new_tokens, generate.Sampling(), eos_id=-1)
  rng = np.random.default_rng(seed)
  prompts = rng.integers(4, 260, (batch_size, prompt_len)).tolist()
  batch, cache = gen.start(prompts)
  jax.block_until_ready((params, cache))
  return params, gen, batch, cache


def _warm_backend():
  """Compile an unrelated small program so no timed compile pays XLA's start-up cost."""
  import jax
  import jax.numpy as jnp
  jax.jit(lambda a: jnp.tanh(a @ a.T).sum()).lower(jnp.ones((8, 8))).compile()


def _timed(fn, runs: int) -> list[float]:
  """Wall seconds of ``runs`` calls of ``fn`` (blocking on its result), after one warm-up."""
  import jax
  jax.block_until_ready(fn())
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def measure_compile(num_layers: int, scan_layers: bool, batch_size: int, prompt_len: int,
                    new_tokens: int, loop_runs: int) -> dict:
  """Table A point: lower/compile prefill, one decode step and the decode loop; run them."""
  import jax
  import jax.numpy as jnp

  from xlps.models import transformer

  spec = _spec(num_layers, scan_layers)
  module = transformer.DecoderLM(spec)
  params, gen, batch, cache = _setup(spec, batch_size, prompt_len, new_tokens)
  _warm_backend()

  def decode_step(p, token, cache, pos):
    logits, cache = module.apply({"params": p}, {"inputs": token[:, None],
                                                 "positions": pos[:, None]}, cache=cache)
    return logits[:, 0], cache

  step = jax.jit(decode_step)
  result = {"backend": jax.default_backend()}

  def lower_compile(name, jitted, *xs):
    t0 = time.perf_counter()
    lowered = jitted.lower(*xs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    result[f"{name}_lower_s"] = t1 - t0
    result[f"{name}_compile_s"] = t2 - t1
    result[f"{name}_hlo_lines"] = len(lowered.as_text().splitlines())
    return compiled

  # Order: prefill, step, loop (each program's first trace and compile in this process).
  prefill = lower_compile("prefill", gen.prefill, params, batch, cache)
  logits, filled = prefill(params, batch, cache)
  token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  step_c = lower_compile("step", step, params, token, filled, batch["lengths"])
  loop = lower_compile("loop", gen.decode, params, logits, filled, batch["lengths"])

  # Sanity: the step's greedy token after the first one is the loop's second token.
  out = loop(params, logits, filled, batch["lengths"])
  step_logits, _ = step_c(params, token, filled, batch["lengths"])
  result["step_matches_loop"] = bool(
      (jnp.argmax(step_logits, -1) == out.tokens[:, 1]).all()
      & (out.tokens[:, 0] == token).all())
  result["generated"] = int(out.lengths.min())
  result["finite"] = bool(jnp.isfinite(step_logits).all())

  result["prefill_s"] = statistics.median(_timed(lambda: prefill(params, batch, cache),
                                                 loop_runs))
  result["loop_s"] = statistics.median(
      _timed(lambda: loop(params, logits, filled, batch["lengths"]), loop_runs))
  return result


def measure_speed(prompt_len: int, new_tokens: int, speed_runs: int) -> dict:
  """Table B: prefill / decode tokens/s of the default model at batch 1 and 8; matmul GFLOP/s."""
  import jax
  import jax.numpy as jnp

  spec = _spec(6)
  rows = []
  for batch_size in (1, 8):
    params, gen, batch, cache = _setup(spec, batch_size, prompt_len, new_tokens)
    logits, filled = gen.prefill(params, batch, cache)
    prefill = _timed(lambda: gen.prefill(params, batch, cache), speed_runs)
    decode = _timed(lambda: gen.decode(params, logits, filled, batch["lengths"]), speed_runs)
    out = gen.decode(params, logits, filled, batch["lengths"])
    rows.append({"batch": batch_size, "prefill_s": prefill, "decode_s": decode,
                 "generated": int(out.lengths.min())})
  a = jax.random.normal(jax.random.PRNGKey(0), (1024, 1024), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (1024, 1024), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  mm = _timed(lambda: matmul(a, b), 20)
  return {"rows": rows, "matmul_gflops": 2 * 1024**3 / statistics.median(mm) / 1e9,
          "matmul_gflops_range": [2 * 1024**3 / max(mm) / 1e9, 2 * 1024**3 / min(mm) / 1e9],
          "backend": jax.default_backend()}


def measure_cache(batch_size: int, prompt_len: int, new_tokens: int,
                  cache_depths: list[int]) -> dict:
  """Table C: bytes per cached token, formula vs. allocated buffers."""
  from xlps import models
  from xlps.models import transformer

  b, t = batch_size, prompt_len + new_tokens
  rows = []
  for n in cache_depths:
    for kv_heads in (4, 1):
      for label, policy, group, m_unique, order in CACHE_POLICIES:
        spec = _spec(n, num_kv_heads=kv_heads, kv_policy=policy, group_size=group,
                     num_unique=m_unique, order=order)
        formula = models.kv_cache_bytes(spec)
        cache = transformer.init_cache(spec, b, t)
        allocated = (cache["decoder"]["k"].nbytes + cache["decoder"]["v"].nbytes
                     + cache["valid"].nbytes)
        rows.append({"N": n, "kv_heads": kv_heads, "policy": label,
                     "entries": formula["entries"], "formula": formula["bytes_per_token"],
                     "measured": allocated / (b * t), "total_bytes": allocated,
                     "k_shape": list(cache["decoder"]["k"].shape)})
  return {"rows": rows, "batch": b, "length": t}


# -------------------------------------------------------------------------- parent side


def run_child(part: str, num_layers: int = 6, scan_layers: bool = True) -> dict:
  """Table ``part`` ("compile", "speed" or "cache") measured in a fresh process."""
  b, p, g = _BATCH_SIZE.value, _PROMPT_LEN.value, _NEW_TOKENS.value
  if part == "compile":
    return harness.child("measure_compile", dict(
        num_layers=num_layers, scan_layers=scan_layers, batch_size=b, prompt_len=p,
        new_tokens=g, loop_runs=_LOOP_RUNS.value))
  if part == "speed":
    return harness.child("measure_speed", dict(prompt_len=p, new_tokens=g,
                                               speed_runs=_SPEED_RUNS.value))
  return harness.child("measure_cache", dict(
      batch_size=b, prompt_len=p, new_tokens=g,
      cache_depths=[int(x) for x in _CACHE_DEPTHS.value if x.strip()]))


_fmt_s = harness.median_range


def _table(cols: list[str], rows: list[list[str]]) -> list[str]:
  return (["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
          + ["| " + " | ".join(r) + " |" for r in rows])


def _log(start: float, msg: str) -> None:
  print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)


def main(argv):
  del argv
  depths = [int(x) for x in _DEPTHS.value if x.strip()]
  start = time.perf_counter()
  load_start = os.getloadavg()
  b, p, g = _BATCH_SIZE.value, _PROMPT_LEN.value, _NEW_TOKENS.value

  import flax
  import jax  # only for the version strings in the report

  # ---- Table A
  points = {}  # (label, N) -> list of child results
  for n in depths:
    for label, scan in VARIANTS:
      if not scan and n > _UNROLLED_MAX_DEPTH.value:
        _log(start, f"{label} N={n}: skipped (> --unrolled_max_depth={_UNROLLED_MAX_DEPTH.value})")
        continue
      results = []
      for _ in range(_REPEATS.value):
        r = run_child("compile", n, scan)
        if not (r["step_matches_loop"] and r["finite"] and r["generated"] == g):
          raise RuntimeError(f"{label} N={n}: sanity check failed: {r}")
        results.append(r)
      points[(label, n)] = results
      med = lambda k: statistics.median(x[k] for x in results)  # noqa: E731
      _log(start, f"{label} N={n}: prefill {med('prefill_lower_s'):.2f}+"
           f"{med('prefill_compile_s'):.2f}s step {med('step_lower_s'):.2f}+"
           f"{med('step_compile_s'):.2f}s loop {med('loop_lower_s'):.2f}+"
           f"{med('loop_compile_s'):.2f}s; loop run {med('loop_s'):.3f}s")

  compile_rows, speed_rows = [], []
  for n in depths:
    for label, scan in VARIANTS:
      results = points.get((label, n))
      if results is None:
        compile_rows.append([label, str(n)] + [f"skipped (N > {_UNROLLED_MAX_DEPTH.value})"]
                            + [""] * 8)
        continue
      col = lambda k: [x[k] for x in results]  # noqa: E731
      both = lambda k: [x[f"{k}_lower_s"] + x[f"{k}_compile_s"] for x in results]  # noqa: E731
      compile_rows.append([
          label, str(n), _fmt_s(col("prefill_lower_s")), _fmt_s(col("prefill_compile_s")),
          _fmt_s(col("step_lower_s")), _fmt_s(col("step_compile_s")), _fmt_s(both("step")),
          str(results[0]["step_hlo_lines"]), _fmt_s(col("loop_lower_s")),
          _fmt_s(col("loop_compile_s")), str(results[0]["loop_hlo_lines"])])
      step_ms = [1e3 * x["loop_s"] / g for x in results]
      speed_rows.append([
          label, str(n), _fmt_s([b * p / x["prefill_s"] for x in results], 0),
          _fmt_s(step_ms, 2), _fmt_s([b / (ms / 1e3) for ms in step_ms], 0)])

  # ---- Table B
  speed = run_child("speed")
  _log(start, f"speed: {speed}")
  b_rows = []
  for row in speed["rows"]:
    pf = [row["batch"] * p / s for s in row["prefill_s"]]
    dec = [row["batch"] * g / s for s in row["decode_s"]]
    ms = [1e3 * s / g for s in row["decode_s"]]
    b_rows.append([str(row["batch"]), _fmt_s([1e3 * s for s in row["prefill_s"]], 2),
                   _fmt_s(pf, 0), _fmt_s(ms, 2), _fmt_s(dec, 0)])

  # ---- Table C
  cache = run_child("cache")
  _log(start, "cache: done")
  c_rows, agree = [], True
  for r in cache["rows"]:
    ok = abs(r["formula"] - r["measured"]) < 1e-9
    agree &= ok
    c_rows.append([str(r["N"]), "MHA (4)" if r["kv_heads"] == 4 else "MQA (1)", r["policy"],
                   str(r["entries"]), f"{r['formula']:,}", f"{r['measured']:,.0f}",
                   "yes" if ok else "NO", f"{r['total_bytes'] / 2**20:.2f}",
                   "x".join(map(str, r["k_shape"]))])

  # ---- verdicts from the numbers
  def total(label, n, k):
    return statistics.median(x[f"{k}_lower_s"] + x[f"{k}_compile_s"]
                             for x in points[(label, n)])

  def growth(label, lo, hi):
    return [f"{name} {total(label, lo, k):.2f} -> {total(label, hi, k):.2f} s "
            f"({total(label, hi, k) / total(label, lo, k):.2f}x)"
            for k, name in (("prefill", "prefill"), ("step", "decode step"),
                            ("loop", "decode loop"))]

  verdict = []
  scan_ns = [n for n in depths if ("scan", n) in points]
  if len(scan_ns) >= 2:
    lo, hi = scan_ns[0], scan_ns[-1]
    parts = growth("scan", lo, hi)
    step_hlo = {n: points[("scan", n)][0]["step_hlo_lines"] for n in scan_ns}
    flat = all(total("scan", hi, k) / total("scan", lo, k) < 1.5
               for k in ("prefill", "step", "loop"))
    verdict.append(
        f"**Scan: compile time is {'flat' if flat else 'NOT flat'} in N.** From N={lo} to "
        f"N={hi} ({hi // lo}x the depth), lower+compile goes " + "; ".join(parts) +
        ". The decode step's HLO is "
        + ", ".join(f"{v} lines at N={n}" for n, v in step_hlo.items())
        + " (the same program; only the cache's depth dimension changes).")
  unrolled_ns = [n for n in depths if ("unrolled", n) in points]
  if len(unrolled_ns) >= 2:
    lo, hi = unrolled_ns[0], unrolled_ns[-1]
    parts = growth("unrolled", lo, hi)
    hlo = {n: points[("unrolled", n)][0]["step_hlo_lines"] for n in unrolled_ns}
    text = (f"**Unrolled: compile time grows with N.** From N={lo} to N={hi} ({hi // lo}x), "
            + "; ".join(parts) + "; decode-step HLO "
            + " -> ".join(str(v) for v in hlo.values())
            + " lines (one copy of the layer per applied layer).")
    if ("scan", hi) in points:
      text += (f" At N={hi} the unrolled decode step takes "
               f"{total('unrolled', hi, 'step') / total('scan', hi, 'step'):.1f}x the scanned "
               "one's lower+compile time.")
    verdict.append(text)
  by_batch = {r["batch"]: statistics.median(r["decode_s"]) for r in speed["rows"]}
  if 1 in by_batch and 8 in by_batch:
    ratio = by_batch[8] / by_batch[1]
    verdict.append(
        f"Table B: a batch-8 decode step takes {ratio:.1f}x the batch-1 step, so batch 8 "
        f"gives {8 / ratio:.2f}x the tokens/s of batch 1: at this model size the step's cost "
        "is per row (attention over the row's cache, the cache's per-layer slices and "
        "updates), not the weights, which batching would amortise. Per-step time grows "
        "about linearly with N (Table A run times); scan and unrolled run alike.")
  verdict.append(
      "Table C: the formula (`models.kv_cache_bytes`) and the allocated buffers "
      f"(`transformer.init_cache`) **{'agree on every row' if agree else 'DISAGREE'}**.")

  elapsed = time.perf_counter() - start
  load_end = os.getloadavg()
  mm = speed["matmul_gflops"]
  report = [
      "# Decode: compile time vs. applied depth, tokens/s, cache bytes per token",
      "",
      f"Command: `{harness.command()}`",
      "",
      f"jax {jax.__version__}, flax {flax.__version__}, backend {jax.default_backend()}, "
      f"{os.cpu_count()} CPU cores visible. Total benchmark wall time: {elapsed:.1f} s. "
      f"1-min load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f} (on "
      f"{os.cpu_count()} cores; other processes on the machine inflate and spread the times).",
      "",
      "Model: `configs/default.py` (decoder_lm, d_model 128, 4 heads, d_ff 512 SwiGLU, "
      "RMSNorm, learned positions, vocab 260, max_len 128, one unique layer M=1, "
      "kv_sharing per_layer, float32) with random parameters; prompts of random tokens in "
      "[4, 260). Greedy decoding with `eos_id=-1`, so every row generates all new tokens.",
      "",
      "## Verdict",
      "",
  ] + [f"- {v}" for v in verdict if v] + [
      "",
      "## A. Compile time vs. applied depth N",
      "",
      f"Batch {b} prompts x {p} tokens, {g} new tokens (cache length {p + g}). Each row: "
      f"{_REPEATS.value} fresh process(es), persistent compilation cache off; seconds, median "
      "(min-max). `lower` = `jitted.lower(...)` (trace + lowering to StableHLO), `compile` = "
      "`lowered.compile()` (XLA). Programs, compiled in this order in each process: "
      "prefill = `LMGenerator.prefill` (the prompt chunk against the empty cache); step = "
      "one decode step, `jax.jit` of `(params, token [B], cache, positions [B]) -> (logits "
      "[B, V], cache)` calling the model once on a 1-token chunk; loop = `LMGenerator.decode`"
      f" (the `while_loop` over {g} new tokens, the step inside). HLO lines = "
      "`lowered.as_text()` lines. Sanity per process: the step's greedy token equals the "
      "loop's second token, logits finite, all tokens generated.",
      "",
  ] + _table(["variant", "N", "prefill lower s", "prefill compile s", "step lower s",
              "step compile s", "step lower+compile s", "step HLO lines", "loop lower s",
              "loop compile s", "loop HLO lines"], compile_rows) + [
      "",
      f"Run time of the same compiled programs, per process the median of {_LOOP_RUNS.value} "
      "runs after a warm-up, then the median (min-max) over processes. Prefill tokens/s = "
      f"{b} x {p} / prefill time; ms/step = decode loop time / {g} (the whole batch of {b} "
      f"rows per step); decode tokens/s = {b} / step time.",
      "",
  ] + _table(["variant", "N", "prefill tokens/s", "decode ms/step", "decode tokens/s"],
             speed_rows) + [
      "",
      "## B. Default model (N=6) speed",
      "",
      f"One process; prompt {p} tokens, {g} new tokens; median (min-max) of "
      f"{_SPEED_RUNS.value} timed runs after a warm-up (compile excluded). Prefill tokens/s "
      f"= batch x {p} / prefill time; decode tokens/s = batch x {g} / decode-loop time. "
      f"Float32 matmul ceiling in the same process: {mm:.1f} GFLOP/s "
      f"({speed['matmul_gflops_range'][0]:.1f}-{speed['matmul_gflops_range'][1]:.1f}; "
      "1024x1024 @ 1024x1024, jitted, median of 20 runs).",
      "",
  ] + _table(["batch", "prefill ms", "prefill tokens/s", "decode ms/step", "decode tokens/s"],
             b_rows) + [
      "",
      "## C. Decode cache bytes per token",
      "",
      "Default model with `model.kv_sharing` set per row (recursive reads the entry of its "
      "layer's sharing slot, so M=1 is one entry and M=3 cycle three). formula = "
      "`models.kv_cache_bytes(spec)['bytes_per_token']` (2 x C entries x kv_heads x "
      "head_dim 32 x 4 bytes + 1 validity byte); allocated = (nbytes of "
      "`cache['decoder']['k']`, `['v']` and `cache['valid']`) / (B x T) from "
      f"`transformer.init_cache(spec, B={cache['batch']}, T={cache['length']})`; total = "
      "those buffers in MiB.",
      "",
  ] + _table(["N", "K/V heads", "policy", "entries C", "formula bytes/token",
              "allocated bytes/token", "agree", "total MiB", "k shape"], c_rows) + [""]
  harness.report("\n".join(report), _OUT.value)


if __name__ == "__main__":
  harness.run(main)
