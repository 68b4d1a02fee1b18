"""Step time and per-device parameter bytes of the default config on 1 vs 8 fake CPU devices.

    .venv/bin/python -m bench.sharding --steps=10 --out=bench/sharding.md

Fake CPU devices share the same 2 cores, so 8 devices are expected to be *slower*; the
point is that the sharded programs run and that parameters are not replicated by accident
(per-device bytes shrink with fsdp / tensor).
"""

import os
import statistics

import jax
import numpy as np
from absl import flags

from bench import harness
from bench.sharded_run import lm_batch, sharded_steps
from configs import default
from xlps import models, partitioning

_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per mesh (after one).")
_OUT = flags.DEFINE_string("out", "", "Also write the markdown report here.")

MESHES = [("1 device", {}), ("data=8", {"data": 8}), ("fsdp=8", {"fsdp": 8}),
          ("data=2 fsdp=2 tensor=2", {"data": 2, "fsdp": 2, "tensor": 2}),
          ("tensor=2 fsdp=4", {"tensor": 2, "fsdp": 4})]


def measure(config, axes, steps):
  """(median step time, params bytes / device, train state bytes / device) on ``axes``."""
  s = sharded_steps(config, config.train, axes)
  batch = s.global_batch(lm_batch(np.random.default_rng(0), config.train.batch_size,
                                  config.data.seq_len, 4, 260))
  state = s.state
  param_bytes = partitioning.per_device_bytes(state.params)
  state_bytes = partitioning.per_device_bytes(state)
  s.compile_train(state, batch)
  _, _, times = harness.timed_steps(s.train, state, batch, steps + 1)
  return statistics.median(times[1:]), param_bytes, state_bytes


def main(argv):
  del argv
  config = default.get_config("tied")
  total = sum(x.size * 4 for x in jax.tree.leaves(
      jax.eval_shape(lambda: models.init_params(config))))
  rows = ["| mesh | step time (median) | vs 1 device | params / device | train state / device |",
          "|---|---|---|---|---|"]
  base = None
  for name, axes in MESHES:
    t, pb, sb = measure(config, axes, _STEPS.value)
    base = base or t
    rows.append(f"| {name} | {t * 1000:.0f} ms | {t / base:.2f}x | {pb / 1e6:.3f} MB "
                f"({pb / total:.0%}) | {sb / 1e6:.3f} MB |")
  text = "\n".join([
      "# Sharded train step: default config (d_model 128, N 6 tied, batch 16 x 128 tokens)",
      "", f"`{harness.command()}`; jax {jax.__version__}, "
      f"8 fake CPU devices on {os.cpu_count()} cores; unique params {total / 4:,.0f} "
      f"({total / 1e6:.3f} MB float32).", "", *rows])
  harness.report(text, _OUT.value)


if __name__ == "__main__":
  harness.run(main, cpu_devices=8)
