"""Step time and per-device parameter bytes of the default config on 1 vs 8 fake CPU devices.

    PYTHONPATH=. .venv/bin/python bench/sharding.py [--steps 10] [--out bench/sharding.md]

Fake CPU devices share the same 2 cores, so 8 devices are expected to be *slower*; the
point is that the sharded programs run and that parameters are not replicated by accident
(per-device bytes shrink with fsdp / tensor).
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.sharded_run import lm_batch, sharded_steps  # noqa: E402
from configs import default  # noqa: E402
from xlps import models, partitioning  # noqa: E402

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
  times = []
  for _ in range(steps + 1):
    t0 = time.perf_counter()
    state, metrics = s.train(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return statistics.median(times[1:]), param_bytes, state_bytes


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  config = default.get_config("tied")
  total = sum(x.size * 4 for x in jax.tree.leaves(
      jax.eval_shape(lambda: models.init_params(config))))
  rows = ["| mesh | step time (median) | vs 1 device | params / device | train state / device |",
          "|---|---|---|---|---|"]
  base = None
  for name, axes in MESHES:
    t, pb, sb = measure(config, axes, args.steps)
    base = base or t
    rows.append(f"| {name} | {t * 1000:.0f} ms | {t / base:.2f}x | {pb / 1e6:.3f} MB "
                f"({pb / total:.0%}) | {sb / 1e6:.3f} MB |")
  text = "\n".join([
      "# Sharded train step: default config (d_model 128, N 6 tied, batch 16 x 128 tokens)",
      "", f"`PYTHONPATH=. .venv/bin/python bench/sharding.py --steps {args.steps}`; jax {jax.__version__}, "
      f"8 fake CPU devices on {os.cpu_count()} cores; unique params {total / 4:,.0f} "
      f"({total / 1e6:.3f} MB float32).", "", *rows])
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
