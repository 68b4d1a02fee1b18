"""What a training run reports: throughput and MFU, progress lines, metrics files.

``Throughput`` turns a window of steps into steps/s, tokens/s and MFU, leaving out the time
spent in evaluation and checkpointing (``paused``). ``tokens_per_sec`` counts processed
tokens: every position the model ran on, globally, padding included (encoder_decoder: source
plus target positions), not only the loss-weighted ones. ``useful_tokens_per_sec`` counts the
non-pad ones (``xlps.families.useful_tokens``, summed on device by the train step) and
``padding_fraction`` is the share of processed tokens that were padding. MFU counts the
FLOPs actually run, padding included.
``MetricWriter`` appends each record to ``WORKDIR/metrics.jsonl`` and TensorBoard.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
from absl import logging
from etils import epath

# Peak dense FLOP/s per device by device kind (bf16; float32 on CPU is measured instead).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100": 312e12}


def measured_peak_flops(n: int = 1024, repeats: int = 5) -> float:
  """Best float32 matmul FLOP/s of this device: the CPU's practical ceiling for MFU."""
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def peak_flops(per_device: float = 0.0) -> tuple[float, str]:
  """Peak FLOP/s of all devices and where the number comes from (config, kind, measured)."""
  devices = jax.devices()
  if per_device:
    return per_device * len(devices), "config"
  kind = devices[0].device_kind
  for prefix, flops in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return flops * len(devices), kind
  return measured_peak_flops(), f"measured {kind} matmul peak"


class Throughput:
  """Steps/s, processed and useful tokens/s and MFU of the window since the last ``report``,
  without pauses."""

  def __init__(self, tokens_per_step: int, flops_per_step: float, peak: float):
    self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak
    self._steps, self._paused, self._start = 0, 0.0, time.perf_counter()

  def step(self) -> None:
    self._steps += 1

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Time inside is not training time (evaluation, checkpoint saves)."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - start

  def report(self, useful_tokens: float) -> dict[str, float]:
    """The window's rates, given its count of useful (non-pad) tokens; starts a new window."""
    seconds = time.perf_counter() - self._start - self._paused
    steps_per_sec = self._steps / seconds
    processed = self._steps * self.tokens_per_step
    self._steps, self._paused, self._start = 0, 0.0, time.perf_counter()
    return {"steps_per_sec": steps_per_sec, "tokens_per_sec": processed / seconds,
            "useful_tokens_per_sec": useful_tokens / seconds,
            "padding_fraction": 1.0 - useful_tokens / processed,
            "mfu": steps_per_sec * self.flops_per_step / self.peak}


def log_progress(step: int, num_steps: int, record: Mapping[str, float], steps_done: int,
                 seconds: float) -> None:
  """One console line per record: train metrics and/or eval losses, and the ETA."""
  parts = [f"step {step}/{num_steps}"]
  if "train_loss" in record:
    parts += [f"loss {record['train_loss']:.4f}",
              f"{record['tokens_per_sec']:.0f} tok/s processed, "
              f"{record['useful_tokens_per_sec']:.0f} useful "
              f"({100 * record['padding_fraction']:.1f}% padding)",
              f"MFU {100 * record['mfu']:.1f}%"]
  eta = (num_steps - step) * seconds / max(steps_done, 1)
  parts.append("ETA " + time.strftime("%H:%M:%S", time.gmtime(eta)))
  parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("eval") and
            k.endswith("loss")]
  logging.info(" | ".join(parts))


class MetricWriter:
  """``metrics.jsonl`` (one object per record) plus TensorBoard event files.

  Each step is recorded exactly once: a run that starts at step ``start_step`` (0, or the
  restored checkpoint's) first drops the rows past it, which a killed run wrote after its
  last checkpoint and the resumed run writes again, and rewrites the TensorBoard events
  from the rows kept (``metrics.jsonl`` is the record; the events are derived from it).
  Local workdirs then append to both. Object stores (gs://) cannot append: there the JSON
  lines are rewritten whole and the events, written to a local staging folder, are
  copied over after every record.
  """

  def __init__(self, workdir: epath.Path, enabled: bool = True, start_step: int = 0):
    self.enabled = enabled
    self.path = workdir / "metrics.jsonl"
    self._tb = self._staging = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # writes event files without TensorFlow
    self._tb_dir = workdir / "tensorboard"
    self._lines = self._kept_lines(start_step)
    if "://" in os.fspath(workdir):  # one object write is atomic
      self.path.write_text("".join(self._lines))
    else:  # a kill leaves the old or the new file, never half of one
      tmp = self.path.parent / f"{self.path.name}.tmp"
      tmp.write_text("".join(self._lines))
      os.replace(tmp, self.path)
    if self._tb_dir.exists():
      for event_file in self._tb_dir.iterdir():
        event_file.unlink()
    if "://" in os.fspath(workdir):
      self._staging = tempfile.mkdtemp(prefix="xlps_tensorboard_")
    self._tb = SummaryWriter(self._staging or os.fspath(self._tb_dir))
    for line in self._lines:
      row = json.loads(line)
      step = row.pop("step")
      for key, value in row.items():
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def _kept_lines(self, start_step: int) -> list[str]:
    """The existing rows up to ``start_step`` (a torn last line from a kill is dropped)."""
    if not self.path.exists():
      return []
    kept = []
    for line in self.path.read_text().splitlines(True):
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if line.endswith("\n") and row.get("step", math.inf) <= start_step:
        kept.append(line)
    return kept

  def write(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    line = json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n"
    for key, value in values.items():
      self._tb.add_scalar(key, float(value), step)
    self._tb.flush()
    if self._staging is None:
      with self.path.open("a") as f:
        f.write(line)
      return
    self._lines.append(line)
    self.path.write_text("".join(self._lines))
    self._upload_events()

  def _upload_events(self) -> None:
    self._tb_dir.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(self._staging):
      with open(os.path.join(self._staging, name), "rb") as f:
        (self._tb_dir / name).write_bytes(f.read())

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._staging is not None:
      self._upload_events()
      shutil.rmtree(self._staging, ignore_errors=True)
