"""Trace+lower and compile time of a jitted forward+backward pass vs. applied depth N.

Compares, for a decoder LM, the scanned depth engine (fully tied, and M=3 with order
"cycle") against the unrolled reference (``scan_layers=False``, fully tied). The scanned
engine should be roughly flat in N; the unrolled loop grows with N.

Every measurement runs in a fresh Python process (this script re-invoked with
``--single``) with JAX's persistent compilation cache disabled, so no in-memory or on-disk
cache can serve a later measurement. Each point is repeated ``--repeats`` times and the
median is reported.

Usage (from the repository root):

  .venv/bin/python bench/compile_time.py                       # defaults
  .venv/bin/python bench/compile_time.py --depths 6,24 --repeats 1 --out bench/compile_time.md
  .venv/bin/python bench/compile_time.py --remat_policy full --execute   # also run each step once
  .venv/bin/python bench/compile_time.py --only adaptive --out bench/compile_time_adaptive.md
  .venv/bin/python bench/compile_time.py --only relaxed --out bench/compile_time_relaxed.md

The program is a train-mode step (dropout key given): a looped model samples its
iterations inside it, an ACT model adds its ponder cost and a routed one its router loss
(expert-choice top-k), as ``train_step`` does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time

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


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--depths", default="6,24,96", help="comma-separated applied depths N")
  p.add_argument("--unrolled_max_depth", type=int, default=24,
                 help="largest N for which the unrolled variant is measured")
  p.add_argument("--repeats", type=int, default=3, help="fresh-process repeats per point")
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--num_heads", type=int, default=4)
  p.add_argument("--d_ff", type=int, default=1024)
  p.add_argument("--vocab_size", type=int, default=256)
  p.add_argument("--max_len", type=int, default=128)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--remat_policy", default="none",
                 help="model.remat_policy (none | full | a jax.checkpoint_policies name)")
  p.add_argument("--execute", action="store_true",
                 help="also run each compiled step once (untimed sanity check: finite loss)")
  p.add_argument("--out", default=None, help="also write the markdown report here")
  p.add_argument("--only", default="", help="measure only variants whose label contains this")
  # Internal: measure one point in this process and print one JSON line.
  p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--num_layers", type=int, default=6, help=argparse.SUPPRESS)
  p.add_argument("--num_unique", type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument("--order", default="cycle", help=argparse.SUPPRESS)
  p.add_argument("--scan_layers", type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
  return p.parse_args(argv)


# --------------------------------------------------------------------------- child side


def measure_single(args) -> dict:
  """One uncached trace+lower and compile of value_and_grad(loss) in this fresh process."""
  import jax
  jax.config.update("jax_enable_compilation_cache", False)  # no persistent (disk) cache
  import flax.linen as nn
  import jax.numpy as jnp

  from xlps import config as C
  from xlps import models, train

  m = C.model_config()
  m.family = "decoder_lm"
  m.d_model = args.d_model
  m.num_heads = args.num_heads
  m.d_ff = args.d_ff
  m.vocab_size = args.vocab_size
  m.max_len = args.max_len
  m.num_layers = args.num_layers
  m.sharing.num_unique = args.num_unique
  m.sharing.order = args.order
  m.scan_layers = bool(args.scan_layers)
  m.remat_policy = args.remat_policy
  for key, value in json.loads(args.extra).items():
    section, name = key.split(".")
    m[section][name] = value
  spec = models.spec_of(m)
  module = models.build(spec)

  # Lowering and compiling need only shapes and dtypes, so the parameters are the abstract
  # result of init_params (jax.eval_shape: no init compile, no memory); real parameters are
  # made only for --execute. The batch is concrete (example_batch).
  init = lambda: nn.unbox(models.init_params(spec))  # noqa: E731
  params = jax.jit(init)() if args.execute else jax.eval_shape(init)
  leaf_count = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
  unique = models.summarize(spec, seq_len=args.seq_len)["unique_params"]
  batch = models.example_batch(spec, args.batch_size, args.seq_len, seed=1)
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
  if args.execute:  # sanity: run the compiled step once (not timed)
    loss, grads = compiled(params, batch)
    loss = float(loss)
    if not loss == loss:  # NaN
      raise RuntimeError(f"loss is NaN for {vars(args)}")
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


def run_child(args, num_layers: int, scan_layers: bool, num_unique: int, order: str,
              extra: dict) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--single",
         "--num_layers", str(num_layers), "--num_unique", str(num_unique), "--order", order,
         "--scan_layers", str(int(scan_layers)), "--extra", json.dumps(extra),
         "--d_model", str(args.d_model), "--num_heads", str(args.num_heads),
         "--d_ff", str(args.d_ff), "--vocab_size", str(args.vocab_size),
         "--max_len", str(args.max_len), "--seq_len", str(args.seq_len),
         "--batch_size", str(args.batch_size), "--remat_policy", args.remat_policy]
  if args.execute:
    cmd.append("--execute")
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = repo_root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo_root)
  if proc.returncode != 0:
    raise RuntimeError(f"child failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_s(values: list[float]) -> str:
  med = statistics.median(values)
  if len(values) == 1:
    return f"{med:.2f}"
  return f"{med:.2f} ({min(values):.2f}-{max(values):.2f})"


def _fmt_bytes(b) -> str:
  return "n/a" if b is None else f"{b / 2**20:.1f}"


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.single:
    print(json.dumps(measure_single(args)))
    return 0
  if args.seq_len > args.max_len:
    raise SystemExit(f"--seq_len={args.seq_len} exceeds --max_len={args.max_len}")
  depths = [int(x) for x in args.depths.split(",") if x.strip()]
  start = time.perf_counter()
  load_start = os.getloadavg()

  import jax  # only for the version string in the report
  header = [
      "# Compile time of jitted forward+backward vs. applied depth",
      "",
      "Command: `" + " ".join(shlex.quote(a) for a in
                              [os.path.relpath(sys.executable), os.path.relpath(__file__)]
                              + sys.argv[1:]) + "`",
      "",
      f"jax {jax.__version__}, backend {jax.default_backend()}, "
      f"{os.cpu_count()} CPU cores visible.",
      "",
      f"Model: decoder_lm, d_model={args.d_model}, num_heads={args.num_heads}, "
      f"d_ff={args.d_ff}, vocab={args.vocab_size}, max_len={args.max_len}; "
      f"batch {args.batch_size} x seq {args.seq_len}; remat_policy={args.remat_policy}. "
      f"Program: `jax.jit(jax.value_and_grad(mean next-token cross-entropy))` w.r.t. params.",
      "",
      f"Each point: {args.repeats} fresh process(es), persistent compilation cache off; "
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
      if args.only not in label:
        continue
      m_eff = min(m_unique, n)
      if not scan and n > args.unrolled_max_depth:
        rows.append([label, str(n), str(m_eff), "", f"skipped (N > {args.unrolled_max_depth})",
                     "skipped", "skipped", "", ""])
        print(f"[{time.perf_counter() - start:6.1f}s] {label} N={n}: skipped "
              f"(> --unrolled_max_depth={args.unrolled_max_depth})", file=sys.stderr)
        continue
      results = [run_child(args, n, scan, m_eff, order, extra) for _ in range(args.repeats)]
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
  report = "\n".join(header + table + footer)
  print(report)
  if args.out:
    with open(args.out, "w") as f:
      f.write(report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
