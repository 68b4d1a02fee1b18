"""Trace+lower and compile time of a jitted forward+backward pass vs. applied depth N.

Compares, for a decoder LM, the scanned depth engine (fully tied, and M=3 with order
"cycle") against the unrolled reference (``scan_layers=False``, fully tied). The scanned
engine should be roughly flat in N; the unrolled loop grows with N.

Every measurement runs in a fresh Python process (this script re-invoked with
``--child``, ``bench.harness.child``) with JAX's persistent compilation cache disabled, so
no in-memory or on-disk cache can serve a later measurement. Each point is repeated
``--repeats`` times and the median is reported.

Usage (from the repository root):

    .venv/bin/python -m bench.compile_time --out=bench/compile_time.md   # defaults
    .venv/bin/python -m bench.compile_time --depths=6,24 --repeats=1     # quick
    .venv/bin/python -m bench.compile_time --remat_policy=full --execute  # also run each step once
    .venv/bin/python -m bench.compile_time --only=adaptive --out=bench/compile_time_adaptive.md
    .venv/bin/python -m bench.compile_time --only=relaxed --out=bench/compile_time_relaxed.md

The program is a train-mode step (dropout key given): a looped model samples its
iterations inside it, an ACT model adds its ponder cost and a routed one its router loss
(expert-choice top-k), as ``train_step`` does.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

from absl import flags

from bench import harness

_DEPTHS = flags.DEFINE_list("depths", ["6", "24", "96"], "Applied depths N.")
_UNROLLED_MAX_DEPTH = flags.DEFINE_integer(
    "unrolled_max_depth", 24, "Largest N for which the unrolled variant is measured.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Fresh-process repeats per point.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Attention heads.")
_D_FF = flags.DEFINE_integer("d_ff", 1024, "FFN width.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 256, "Vocabulary size.")
_MAX_LEN = flags.DEFINE_integer("max_len", 128, "model.max_len.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Sequence length of the batch.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Batch size.")
_REMAT_POLICY = flags.DEFINE_string(
    "remat_policy", "none", "model.remat_policy (none | full | a jax.checkpoint_policies name).")
_EXECUTE = flags.DEFINE_bool(
    "execute", False, "Also run each compiled step once (untimed sanity check: finite loss).")
_OUT = flags.DEFINE_string("out", None, "Also write the markdown report here.")
_ONLY = flags.DEFINE_string("only", "", "Measure only variants whose label contains this.")

# (label, scan_layers, num_unique, order, extra model overrides)
VARIANTS = (
    ("scan, tied (M=1)", True, 1, "cycle", {}),
    ("scan, M=3 cycle", True, 3, "cycle", {}),
    ("unrolled, tied (M=1)", False, 1, "cycle", {}),
    # Adaptive depth (--only=adaptive): N is the most steps / iterations; the step samples.
    ("scan, ACT tied (M=1), adaptive", True, 1, "cycle", {"act.enabled": True}),
    ("scan, looped 1+1xr+1, poisson_lognormal mean 4, k=2, adaptive", True, 1, "cycle",
     {"loop.prelude": 1, "loop.core": 1, "loop.coda": 1, "loop.inject": "adapter",
      "loop.train_iterations": "poisson_lognormal", "loop.mean_iterations": 4,
      "loop.backprop_iterations": 2}),
    # Relaxed recursion (--only=relaxed): adapters stacked along N; a routed looped core.
    ("scan, M=3 cycle + LoRA rank 8 per applied layer, relaxed", True, 3, "cycle",
     {"lora.rank": 8, "lora.bias": True}),
    ("scan, looped 1+2xr+1, expert-choice routing, relaxed", True, 1, "cycle",
     {"loop.prelude": 1, "loop.core": 2, "loop.coda": 1, "routing.kind": "expert_choice"}),
)


# --------------------------------------------------------------------------- child side


def measure_single(num_layers: int, num_unique: int, order: str, scan_layers: bool, extra: dict,
                   d_model: int, num_heads: int, d_ff: int, vocab_size: int, max_len: int,
                   seq_len: int, batch_size: int, remat_policy: str, execute: bool) -> dict:
  """One uncached trace+lower and compile of value_and_grad(loss) in this fresh process."""
  import jax
  jax.config.update("jax_enable_compilation_cache", False)  # no persistent (disk) cache
  import flax.linen as nn
  import jax.numpy as jnp

  from xlps import config as C
  from xlps import models, train

  m = C.model_config()
  m.family = "decoder_lm"
  m.d_model = d_model
  m.num_heads = num_heads
  m.d_ff = d_ff
  m.vocab_size = vocab_size
  m.max_len = max_len
  m.num_layers = num_layers
  m.sharing.num_unique = num_unique
  m.sharing.order = order
  m.scan_layers = scan_layers
  m.remat_policy = remat_policy
  for key, value in extra.items():
    section, name = key.split(".")
    m[section][name] = value
  spec = models.spec_of(m)
  module = models.build(spec)

  # Lowering and compiling need only shapes and dtypes, so the parameters are the abstract
  # result of init_params (jax.eval_shape: no init compile, no memory); real parameters are
  # made only for --execute. The batch is concrete (example_batch).
  init = lambda: nn.unbox(models.init_params(spec))  # noqa: E731
  params = jax.jit(init)() if execute else jax.eval_shape(init)
  leaf_count = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
  unique = models.summarize(spec, seq_len=seq_len)["unique_params"]
  batch = models.example_batch(spec, batch_size, seq_len, seed=1)
  jax.block_until_ready((params, batch))
  # Warm up the backend with an unrelated small program so the timed compile does not
  # include XLA's one-time start-up cost in this fresh process.
  jax.jit(lambda a: jnp.tanh(a @ a.T).sum()).lower(jnp.ones((8, 8))).compile()

  def loss_fn(p, b):
    logits, extras = train.apply_model(module, p, {"inputs": b["inputs"]}, deterministic=False,
                                       rngs={"dropout": jax.random.PRNGKey(0)})
    logits = logits[:, :-1].astype(jnp.float32)
    targets = b["inputs"][:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return nll.mean() + 0.01 * extras.get("ponder", 0.0) + extras.get("router_loss", 0.0)

  step = jax.jit(jax.value_and_grad(loss_fn))

  t0 = time.perf_counter()
  lowered = step.lower(params, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()

  hlo_lines = len(lowered.as_text().splitlines())
  temp_bytes = None
  try:
    mem = compiled.memory_analysis()
  except Exception:  # not implemented on some backends
    mem = None
  if mem is not None:
    temp_bytes = getattr(mem, "temp_size_in_bytes", None)

  loss = None
  if execute:  # sanity: run the compiled step once (not timed)
    loss, grads = compiled(params, batch)
    loss = float(loss)
    if not loss == loss:  # NaN
      raise RuntimeError(f"loss is NaN for N={num_layers}, M={num_unique}, scan={scan_layers}, "
                         f"{extra}")
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)

  return {
      "lower_s": t1 - t0,
      "compile_s": t2 - t1,
      "hlo_lines": hlo_lines,
      "temp_bytes": temp_bytes,
      "unique_params": int(unique),
      "leaf_params": leaf_count,
      "loss": loss,
      "backend": jax.default_backend(),
  }


# -------------------------------------------------------------------------- parent side


def run_child(num_layers: int, scan_layers: bool, num_unique: int, order: str,
              extra: dict) -> dict:
  return harness.child("measure_single", dict(
      num_layers=num_layers, num_unique=num_unique, order=order, scan_layers=scan_layers,
      extra=extra, d_model=_D_MODEL.value, num_heads=_NUM_HEADS.value, d_ff=_D_FF.value,
      vocab_size=_VOCAB_SIZE.value, max_len=_MAX_LEN.value, seq_len=_SEQ_LEN.value,
      batch_size=_BATCH_SIZE.value, remat_policy=_REMAT_POLICY.value, execute=_EXECUTE.value))


_fmt_s = harness.median_range


def _fmt_bytes(b) -> str:
  return "n/a" if b is None else f"{b / 2**20:.1f}"


def main(argv):
  del argv
  if _SEQ_LEN.value > _MAX_LEN.value:
    raise SystemExit(f"--seq_len={_SEQ_LEN.value} exceeds --max_len={_MAX_LEN.value}")
  depths = [int(x) for x in _DEPTHS.value if x.strip()]
  start = time.perf_counter()
  load_start = os.getloadavg()

  import jax  # only for the version string in the report
  header = [
      "# Compile time of jitted forward+backward vs. applied depth",
      "",
      f"Command: `{harness.command()}`",
      "",
      f"jax {jax.__version__}, backend {jax.default_backend()}, "
      f"{os.cpu_count()} CPU cores visible.",
      "",
      f"Model: decoder_lm, d_model={_D_MODEL.value}, num_heads={_NUM_HEADS.value}, "
      f"d_ff={_D_FF.value}, vocab={_VOCAB_SIZE.value}, max_len={_MAX_LEN.value}; "
      f"batch {_BATCH_SIZE.value} x seq {_SEQ_LEN.value}; remat_policy={_REMAT_POLICY.value}. "
      f"Program: `jax.jit(jax.value_and_grad(mean next-token cross-entropy))` w.r.t. params.",
      "",
      f"Each point: {_REPEATS.value} fresh process(es), persistent compilation cache off; "
      "times are median (min-max) in seconds. `lower` = `jitted.lower(params, batch)` "
      "(trace + lowering to StableHLO), `compile` = `lowered.compile()` (XLA). "
      "HLO lines = `lowered.as_text()` lines; temp = `compiled.memory_analysis()."
      "temp_size_in_bytes`.",
      "",
  ]
  cols = ["variant", "N", "M", "unique params", "lower s", "compile s", "lower+compile s",
          "HLO lines", "temp MiB"]
  rows = []
  for n in depths:
    for label, scan, m_unique, order, extra in VARIANTS:
      if _ONLY.value not in label:
        continue
      m_eff = min(m_unique, n)
      if not scan and n > _UNROLLED_MAX_DEPTH.value:
        rows.append([label, str(n), str(m_eff), "", f"skipped (N > {_UNROLLED_MAX_DEPTH.value})",
                     "skipped", "skipped", "", ""])
        print(f"[{time.perf_counter() - start:6.1f}s] {label} N={n}: skipped "
              f"(> --unrolled_max_depth={_UNROLLED_MAX_DEPTH.value})", file=sys.stderr)
        continue
      results = [run_child(n, scan, m_eff, order, extra) for _ in range(_REPEATS.value)]
      lower = [r["lower_s"] for r in results]
      comp = [r["compile_s"] for r in results]
      total = [r["lower_s"] + r["compile_s"] for r in results]
      r0 = results[0]
      rows.append([label, str(n), str(m_eff), f"{r0['unique_params']:,}", _fmt_s(lower),
                   _fmt_s(comp), _fmt_s(total), str(r0["hlo_lines"]),
                   _fmt_bytes(r0["temp_bytes"])])
      print(f"[{time.perf_counter() - start:6.1f}s] {label} N={n}: lower "
            f"{statistics.median(lower):.2f}s compile {statistics.median(comp):.2f}s "
            f"hlo {r0['hlo_lines']} loss {r0['loss']} "
            f"(unique {r0['unique_params']}, leaves {r0['leaf_params']})", file=sys.stderr)

  table = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
  table += ["| " + " | ".join(r) + " |" for r in rows]
  elapsed = time.perf_counter() - start
  load_end = os.getloadavg()
  footer = ["", f"Total benchmark wall time: {elapsed:.1f} s. 1-min load average at start "
            f"{load_start[0]:.2f}, at end {load_end[0]:.2f} (on {os.cpu_count()} cores; "
            "other processes on the machine inflate and spread the times).", ""]
  harness.report("\n".join(header + table + footer), _OUT.value)


if __name__ == "__main__":
  harness.run(main)
