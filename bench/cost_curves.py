"""Cost curves of the training step: tokens/s against batch size, sequence length and depth.

One process runs every point of the default weight-tied decoder LM (``configs/default.py``:
d_model 256, one layer applied N times, byte vocab) with the real ``xlps.train`` step
(AdamW). Before each point the in-memory caches are cleared and the persistent cache is
off, so each compile is cold. Reported per point: the cold trace+compile time, the first
step (after compile), the steady-state median step over ``--steps`` steps, processed
tokens/s, model FLOPs/s, MFU against the float32 matmul ceiling measured at the start,
and parameter + optimizer bytes (``memory_analysis`` arguments) and temp bytes.

Expected of weight-tied depth: step time linear in N (tokens/s ~ 1/N), compile time and
parameter bytes flat in N.

    .venv/bin/python -m bench.cost_curves --out=bench/cost_curves.md   # also writes the .png
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import flags

from bench import harness

_STEPS = flags.DEFINE_integer("steps", 3, "Steady-state steps per point (after the first).")
_OUT = flags.DEFINE_string("out", "", "Also write the markdown report here and the plot "
                           "next to it (.png).")

SWEEPS = {
    "batch": dict(values=(1, 2, 4, 8, 16, 32), fixed=dict(seq=128, depth=6)),
    "seq": dict(values=(32, 64, 128, 256, 512), fixed=dict(batch=8, depth=6)),
    "depth": dict(values=(1, 2, 4, 8, 16, 32, 64, 96), fixed=dict(batch=8, seq=128)),
}


def point(batch: int, seq: int, depth: int, steps: int) -> dict:
  import jax
  import numpy as np
  from bench.sharded_run import lm_batch, sharded_steps
  from configs import default
  from xlps import config as config_lib
  from xlps import models, partitioning

  jax.clear_caches()
  config = default.get_config()
  m = config.model
  m.num_layers, m.max_len, m.dropout_rate = depth, max(seq, 128), 0.0
  config.train.batch_size, config.data.seq_len = batch, seq
  spec = config_lib.validate(config)
  setup = sharded_steps(config, config.train, {})
  mesh, rules = setup.mesh, setup.rules
  data = setup.global_batch(lm_batch(np.random.default_rng(0), batch, seq, 1, 256))
  state = setup.state
  start = time.perf_counter()
  with partitioning.activate(mesh, rules):
    compiled = setup.train_fn.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  with partitioning.activate(mesh, rules):
    state, _, times = harness.timed_steps(compiled, state, data, steps + 1)
  step = statistics.median(times[1:])
  summary = models.summarize(spec, seq)
  return {"compile_s": compile_s, "first_step_s": times[0], "step_s": step,
          "tokens_per_s": batch * seq / step,
          "flops_per_s": batch * seq * summary["flops_per_token"] / step,
          "arg_mib": mem.argument_size_in_bytes / 2**20, "temp_mib": mem.temp_size_in_bytes / 2**20,
          "unique_params": summary["unique_params"], "applied_params": summary["applied_params"]}


def main(argv):
  del argv
  import jax
  jax.config.update("jax_enable_compilation_cache", False)
  from xlps import metrics as metrics_lib
  start = time.time()
  ceiling = metrics_lib.measured_peak_flops(2048)
  results = {}
  for name, sweep in SWEEPS.items():
    for value in sweep["values"]:
      shape = {**sweep["fixed"], name: value}
      results[name, value] = r = point(shape["batch"], shape["seq"], shape["depth"],
                                       _STEPS.value)
      print(f"[{time.time() - start:5.0f}s] {name}={value}: {r['tokens_per_s']:.0f} tok/s, "
            f"compile {r['compile_s']:.2f}s", file=sys.stderr)
  lines = ["# Cost curves of the training step", "",
           f"Command: `{harness.command()}`", "",
           f"Decoder LM of configs/default.py (d_model 256, 4 heads, FFN 1024, one unique layer), "
           f"float32, AdamW; {os.cpu_count()} CPU cores, jax {jax.__version__}. float32 matmul "
           f"ceiling measured at the start: {ceiling / 1e9:.0f} GFLOP/s. Steady state = median "
           f"of {_STEPS.value} steps after the first; compile = cold trace + lower + compile.", ""]
  for name, sweep in SWEEPS.items():
    fixed = ", ".join(f"{k} {v}" for k, v in sweep["fixed"].items())
    lines += [f"## Against {name} ({fixed})", "",
              f"| {name} | step s | tokens/s | GFLOP/s | MFU | compile s | first step s | "
              "params+opt MiB | temp MiB | applied params |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for value in sweep["values"]:
      r = results[name, value]
      lines.append(f"| {value} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                   f"{r['flops_per_s'] / 1e9:.1f} | {r['flops_per_s'] / ceiling:.2f} | "
                   f"{r['compile_s']:.2f} | {r['first_step_s']:.3f} | {r['arg_mib']:.1f} | "
                   f"{r['temp_mib']:.0f} | {r['applied_params']:,} |")
    lines.append("")
  depth = SWEEPS["depth"]["values"]
  per_layer = [results["depth", n]["step_s"] / n for n in depth]
  lines += [f"Step time per applied layer (depth sweep): "
            + ", ".join(f"N={n}: {t * 1e3:.0f} ms" for n, t in zip(depth, per_layer))
            + f". Compile time over the depth sweep: {min(results['depth', n]['compile_s'] for n in depth):.2f}"
            f"-{max(results['depth', n]['compile_s'] for n in depth):.2f} s; parameter+optimizer "
            f"bytes {results['depth', depth[0]]['arg_mib']:.1f}-"
            f"{results['depth', depth[-1]]['arg_mib']:.1f} MiB.", "",
            f"Wall time {time.time() - start:.0f} s.", ""]
  harness.report("\n".join(lines), _OUT.value)
  if _OUT.value:
    plot(results, os.path.splitext(_OUT.value)[0] + ".png")


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
  for ax, name in zip(axes, SWEEPS):
    values = SWEEPS[name]["values"]
    ax.plot(values, [results[name, v]["tokens_per_s"] for v in values], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(name)
    ax.set_ylabel("tokens/s")
    ax.grid(alpha=0.3)
  values = SWEEPS["depth"]["values"]
  ax = axes[3]
  ax.plot(values, [results["depth", v]["step_s"] for v in values], "o-", label="step s")
  ax.plot(values, [results["depth", v]["compile_s"] for v in values], "s-", label="compile s")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("applied depth N")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.suptitle("xlps training step cost (default decoder LM, CPU)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  harness.run(main)
