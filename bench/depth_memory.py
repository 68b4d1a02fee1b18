"""Training-step memory vs applied depth N for every remat policy, one- and two-level.

For a decoder LM (d_model 256, 4 heads, FFN 1024, byte vocab, batch 8 x 128, AdamW) and
N = 6, 24, 96, each row compiles the real ``xlps.train`` step in a fresh process and
reports XLA's ``compiled.memory_analysis().temp_size_in_bytes`` (activations, residuals
and scratch: what grows with depth; parameters and optimizer state are arguments) and
the peak resident set size of running one step (``VmHWM`` after resetting it through
``/proc/self/clear_refs`` once compiled, so compile memory is not counted).

``remat_group_size = -1`` is two-level remat: N/k groups of k ~ sqrt(N) layers, each
group saving only its input. The goal (issue 12): temp at N = 96 <= 1.5 x temp at N = 6.
``M=3`` rows use three slots (order cycle): without the slot-gather fix each applied layer
saved its own copy of its slot's weights; ``--before TREE`` measures those rows in an
older source tree as well (this script, with that tree's ``xlps`` and ``configs``).

    .venv/bin/python -m bench.depth_memory --out=bench/depth_memory.md
    .venv/bin/python -m bench.depth_memory --before=/tmp/xlps_before --out=bench/depth_memory.md
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

from bench import harness

ROOT = harness.ROOT
POLICIES = ("none", "full", "nothing_saveable", "everything_saveable", "dots_saveable",
            "dots_with_no_batch_dims_saveable")
DEPTHS = (6, 24, 96)

_BEFORE = flags.DEFINE_string("before", "", "An older xlps source tree: its M=3 rows too.")
_POLICIES = flags.DEFINE_list("policies", list(POLICIES), "Remat policies of the M=1 rows.")
_OUT = flags.DEFINE_string("out", "", "Also write the markdown report here.")


def measure(num_layers: int, policy: str, group: int, num_unique: int) -> dict:
  """Compiles and runs one train step in this process; temp bytes and peak RSS."""
  import numpy as np
  from bench.sharded_run import lm_batch, sharded_steps
  from configs import default
  from xlps import config as config_lib
  from xlps import partitioning

  config = default.get_config()
  m = config.model
  m.num_layers, m.remat_policy, m.sharing.num_unique = num_layers, policy, num_unique
  if group:
    m.remat_group_size = group
  m.dropout_rate = 0.0
  config.train.batch_size, config.data.seq_len, m.max_len = 8, 128, 128
  config_lib.validate(config)
  setup = sharded_steps(config, config.train, {})
  mesh, rules = setup.mesh, setup.rules
  batch = setup.global_batch(lm_batch(np.random.default_rng(0), 8, 128, 1, 256))
  start = time.perf_counter()
  with partitioning.activate(mesh, rules):
    compiled = setup.train_fn.lower(setup.state, batch).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
    f.write("5")
  with partitioning.activate(mesh, rules):
    _, metrics, (step_s,) = harness.timed_steps(compiled, setup.state, batch, 1)
  status = open("/proc/self/status").read()
  hwm = int(status.split("VmHWM:")[1].split()[0]) * 1024
  return {"temp": mem.temp_size_in_bytes, "args": mem.argument_size_in_bytes,
          "peak_rss": hwm, "compile_s": compile_s, "step_s": step_s,
          "loss": float(metrics["loss_sum"] / metrics["tokens"])}


def child(tree: str, n: int, policy: str, group: int, num_unique: int) -> dict:
  return harness.child("measure", dict(num_layers=n, policy=policy, group=group,
                                       num_unique=num_unique), tree=tree, drop_xla_flags=True)


def main(argv):
  del argv
  start = time.time()
  rows = [(policy, group, 1, ROOT) for policy in _POLICIES.value for group in (0, -1)]
  rows += [(policy, group, 3, ROOT) for policy in ("none", "full") for group in (0, -1)]
  if _BEFORE.value:
    rows += [(policy, 0, 3, os.path.abspath(_BEFORE.value)) for policy in ("none", "full")]
  lines = ["# Training-step memory vs applied depth", "",
           f"Command: `{harness.command()}`", "",
           "Decoder LM d_model 256, 4 heads, FFN 1024, vocab 260, batch 8 x 128, AdamW, float32; "
           "one fresh process per cell. temp = XLA temp MiB (activations and residuals); "
           "RSS = peak resident MiB while running one step (compile excluded); ratio = "
           "temp(N=96) / temp(N=6).", "",
           "| policy | two-level (group k) | M | tree | " + " | ".join(
               f"N={n} temp" for n in DEPTHS) + " | temp ratio 96/6 | " + " | ".join(
               f"N={n} RSS" for n in DEPTHS) + " | N=96 step s |",
           "|" + "---|" * (6 + 2 * len(DEPTHS))]
  from xlps import config as config_lib  # noqa: PLC0415 (the tree under test is ROOT)
  for policy, group, num_unique, tree in rows:
    res = [child(tree, n, policy, group, num_unique) for n in DEPTHS]
    ks = "/".join(str(config_lib.remat_group_size(group, n)) for n in DEPTHS) if group else "off"
    name = "this" if tree == ROOT else "before"
    temps = [r["temp"] / 2**20 for r in res]
    lines.append(f"| {policy} | {ks} | {num_unique} | {name} | "
                 + " | ".join(f"{t:.1f}" for t in temps) + f" | {temps[-1] / temps[0]:.2f} | "
                 + " | ".join(f"{r['peak_rss'] / 2**20:.0f}" for r in res)
                 + f" | {res[-1]['step_s']:.2f} |")
    print(f"[{time.time() - start:5.0f}s] {lines[-1]}", file=sys.stderr)
  lines += ["", f"Wall time {time.time() - start:.0f} s.", ""]
  harness.report("\n".join(lines), _OUT.value)


if __name__ == "__main__":
  harness.run(main)
