"""What a training run reports: throughput and MFU, progress lines, metrics files.

``Throughput`` turns a window of steps into steps/s, tokens/s and MFU, leaving out the time
spent in evaluation and checkpointing (``paused``). ``tokens_per_sec`` counts processed
tokens: every position the model ran on, globally, padding included (encoder_decoder: source
plus target positions), not only the loss-weighted ones. ``useful_tokens_per_sec`` counts the
non-pad ones (``xlps.families.useful_tokens``, summed on device by the train step) and
``padding_fraction`` is the share of processed tokens that were padding. MFU counts the
model FLOPs of a step (``xlps.models.train_flops_per_token``), padding included.
``MetricWriter`` appends each record to ``WORKDIR/metrics.jsonl`` (object stores: numbered
parts of bounded size) and TensorBoard; ``read_records`` reads either form.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
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
    self._carried = (0, 0.0)

  def carry(self, steps: int, useful_tokens: float) -> None:
    """A resumed run's window began before the resume: its first ``steps`` steps (with
    ``useful_tokens``, included in the next ``report``'s count) were timed by the run that
    saved the checkpoint, so they count in ``padding_fraction`` but not in the rates."""
    self._carried = (steps, useful_tokens)

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
    carried_steps, carried_useful = self._carried
    window_tokens = (self._steps + carried_steps) * self.tokens_per_step
    self._steps, self._paused, self._start = 0, 0.0, time.perf_counter()
    self._carried = (0, 0.0)
    return {"steps_per_sec": steps_per_sec, "tokens_per_sec": processed / seconds,
            "useful_tokens_per_sec": (useful_tokens - carried_useful) / seconds,
            "padding_fraction": 1.0 - useful_tokens / window_tokens,
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
              f"MFU {100 * record['mfu']:.1f}%", f"lr {record['learning_rate']:.3g}"]
  eta = (num_steps - step) * seconds / max(steps_done, 1)
  parts.append("ETA " + time.strftime("%H:%M:%S", time.gmtime(eta)))
  parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("eval") and
            k.endswith("loss")]
  logging.info(" | ".join(parts))


PART = re.compile(r"metrics-(\d+)\.jsonl")


def part_name(index: int) -> str:
  """The object-store part file ``index`` of a run's records."""
  return f"metrics-{index:05d}.jsonl"


def metric_files(workdir: str | os.PathLike) -> list[epath.Path]:
  """The files holding a run's records, in order: ``metrics.jsonl`` (what a local run writes,
  or an earlier version wrote to an object store), then the ``metrics-NNNNN.jsonl`` parts an
  object-store run writes."""
  workdir = epath.Path(workdir)
  if not workdir.is_dir():
    return []
  parts = sorted((int(m.group(1)), p) for p in workdir.iterdir()
                 if (m := PART.fullmatch(p.name)))
  first = workdir / "metrics.jsonl"
  return ([first] if first.exists() else []) + [p for _, p in parts]


def _complete_lines(text: str) -> list[str]:
  """The rows of one file's text as lines; a torn last line (a killed write) is dropped."""
  lines = []
  for line in text.splitlines(True):
    try:
      json.loads(line)
    except json.JSONDecodeError:
      continue
    if line.endswith("\n"):
      lines.append(line)
  return lines


def read_records(workdir: str | os.PathLike) -> list[dict]:
  """Every record of a run in order (``metrics.jsonl`` and the object-store parts)."""
  return [json.loads(line) for path in metric_files(workdir)
          for line in _complete_lines(path.read_text())]


class MetricWriter:
  """``metrics.jsonl`` (one object per record) plus TensorBoard event files.

  Each step is recorded exactly once: a run that starts at step ``start_step`` (0, or the
  restored checkpoint's) first drops the rows past it, which a killed run wrote after its
  last checkpoint and the resumed run writes again, and rewrites the TensorBoard events
  from the rows kept (the rows are the record; the events are derived from them).
  Local workdirs then append to both. Object stores (gs://) cannot append, and rewriting
  whole files would upload the history again at every record: there the rows go to numbered
  parts ``metrics-NNNNN.jsonl`` (readers concatenate them: ``read_records``, or ``gsutil cat
  WORKDIR/metrics-*.jsonl``), the events to local staging files that rotate, and each record
  uploads only the current part and the current event file, each at most ``PART_BYTES``
  plus one record.
  """

  PART_BYTES = 1 << 16  # object stores: a metrics part or event file's size before the next

  def __init__(self, workdir: epath.Path, enabled: bool = True, start_step: int = 0):
    self.enabled = enabled
    self.path = workdir / "metrics.jsonl"
    self._tb = self._staging = None
    if not enabled:
      return
    self._workdir, self._tb_dir = workdir, workdir / "tensorboard"
    kept = self._keep_rows(start_step)
    if self._tb_dir.exists():
      for event_file in self._tb_dir.iterdir():
        event_file.unlink()
    if "://" in os.fspath(workdir):
      self._staging = tempfile.mkdtemp(prefix="xlps_tensorboard_")
      self._tb_dir.mkdir(parents=True, exist_ok=True)
      self._event_files = 0
    self._open_events()
    for line in kept:
      row = json.loads(line)
      step = row.pop("step")
      self._add(step, row)
    self._tb.flush()
    if self._staging is not None:
      self._upload_events()

  def _keep_rows(self, start_step: int) -> list[str]:
    """Drops the rows past ``start_step`` (and torn lines) from the files; returns the rows
    kept. Local: one ``metrics.jsonl``, replaced whole (a kill leaves the old or the new
    file). Object stores: only the files that change are rewritten (one object write is
    atomic), and writing continues in the last part."""
    files = metric_files(self._workdir)
    texts = [path.read_text() for path in files]
    kept_per_file = [[line for line in _complete_lines(text)
                      if json.loads(line).get("step", math.inf) <= start_step] for text in texts]
    kept = [line for lines in kept_per_file for line in lines]
    if "://" not in os.fspath(self._workdir):
      tmp = self.path.parent / f"{self.path.name}.tmp"
      tmp.write_text("".join(kept))
      os.replace(tmp, self.path)
      for path in files:  # parts of a run copied from an object store are folded in
        if path != self.path:
          path.unlink()
      return kept
    self._part, self._part_lines = 0, []
    for path, text, lines in zip(files, texts, kept_per_file):
      if "".join(lines) != text:
        if lines:
          path.write_text("".join(lines))
        else:
          path.unlink()
      if lines and (m := PART.fullmatch(path.name)):
        self._part, self._part_lines = int(m.group(1)), lines
    if sum(map(len, self._part_lines)) >= self.PART_BYTES:
      self._part, self._part_lines = self._part + 1, []
    return kept

  def _open_events(self) -> None:
    from tensorboardX import SummaryWriter  # writes event files without TensorFlow
    if self._staging is None:
      self._tb = SummaryWriter(os.fspath(self._tb_dir))
    else:  # a numbered suffix: rotated files never share a name
      self._tb = SummaryWriter(self._staging, filename_suffix=f".{self._event_files:05d}")
      self._event_files += 1

  def _add(self, step: int, values: Mapping[str, float]) -> None:
    """Adds one record to the events; on object stores, rotates a full event file."""
    if self._staging is not None and self._staged_bytes() >= self.PART_BYTES:
      self._tb.close()
      self._upload_events(remove=True)
      self._open_events()
    for key, value in values.items():
      self._tb.add_scalar(key, float(value), step)

  def _staged_bytes(self) -> int:
    self._tb.flush()
    return sum(os.path.getsize(os.path.join(self._staging, name))
               for name in os.listdir(self._staging))

  def write(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    line = json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n"
    self._add(step, values)
    self._tb.flush()
    if self._staging is None:
      with self.path.open("a") as f:
        f.write(line)
      return
    if self._part_lines and sum(map(len, self._part_lines)) + len(line) > self.PART_BYTES:
      self._part, self._part_lines = self._part + 1, []
    self._part_lines.append(line)
    (self._workdir / part_name(self._part)).write_text("".join(self._part_lines))
    self._upload_events()

  def _upload_events(self, remove: bool = False) -> None:
    """Copies the staged event files to the workdir; ``remove``: closed files, then deleted."""
    for name in os.listdir(self._staging):
      local = os.path.join(self._staging, name)
      with open(local, "rb") as f:
        (self._tb_dir / name).write_bytes(f.read())
      if remove:
        os.remove(local)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._staging is not None:
      self._upload_events()
      shutil.rmtree(self._staging, ignore_errors=True)
