"""Trains a config; the same command on the same workdir resumes.

    python -m launch.train --config=configs/default.py --workdir=/tmp/xlps_default
    python -m launch.train --config=configs/default.py --workdir=/tmp/xlps_default \
        --config.train.num_steps=2000          # continue a finished run

Multi-host: ``--distributed`` on every host of a pod (``launch/tpu_pod.sh``), or
``launch/local_multiprocess.sh`` for N local CPU processes.
"""

import errno
import logging as py_logging
import os
import re
import sys

from absl import app, flags
from absl import logging
from etils import epath
from ml_collections import config_flags

from xlps import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path:arg).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and plots go here.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize(): from the flags below when given, "
    "else from the cluster's environment (TPU pod, SLURM, ...).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 60,  # xlps.distributed.DEFAULT_HEARTBEAT_TIMEOUT_SECONDS
    "With --distributed: a process silent (dead) for this long makes every other process "
    "abort with a non-zero status and 'another task died' in its log, instead of hanging in "
    "a collective.", lower_bound=1)


class _QuietOrbax(py_logging.Filter):
  """Drops Orbax's per-save INFO chatter from the console (warnings still pass), and the
  tracebacks of its save threads' errors on a full disk: their one-line messages stay, and
  the main thread ends with one ``error:`` line (``disk_full_error``)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if "orbax" not in record.pathname:
      return True
    if record.exc_info and _DISK_FULL.search(f"{record.getMessage()} {record.exc_info[1]}"):
      record.exc_info = record.exc_text = None
    return record.levelno >= py_logging.WARNING


def _quiet_closed_loops(hook):
  """``sys.unraisablehook`` minus the "Event loop is closed" RuntimeErrors that TensorStore's
  write callbacks report once a failed Orbax save has closed its event loop."""
  def quiet(unraisable):
    if not (unraisable.exc_type is RuntimeError
            and str(unraisable.exc_value) == "Event loop is closed"):
      hook(unraisable)
  return quiet


def plot_losses(history: list[dict], path: epath.Path, baseline: float | None) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  train = [h for h in history if "train_loss" in h]
  ax.plot([h["step"] for h in train], [h["train_loss"] for h in train], label="train")
  evals = [h for h in history if "eval_loss" in h]
  if evals:
    ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="validation")
  if baseline:
    ax.axhline(baseline, color="gray", linestyle="--", label="unigram baseline")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.legend()
  fig.tight_layout()
  with path.open("wb") as f:  # epath: also gs://
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)


def report(result: dict) -> str:
  s = result["summary"]
  lines = ["", "== xlps training summary ==",
           f"params: {s['unique_params']:,} unique, {s['applied_params']:,} applied "
           f"(unrolled-equivalent)",
           f"steps: {result['step']}  wall time: {result['wall_time']:.0f} s"
           + ("  (stopped by SIGTERM)" if result["interrupted"] else "")]
  ev = result["last_eval"]
  if "eval_loss" in ev:
    line = f"validation loss {ev['eval_loss']:.4f} (perplexity {ev['eval_perplexity']:.2f})"
    if result["unigram_entropy"]:
      u = result["unigram_entropy"]
      line += f" vs unigram baseline {u:.4f} (perplexity {2.718281828 ** u:.2f})"
    lines.append(line)
  for key, value in ev.items():
    if key.endswith("sequence_accuracy"):
      lines.append(f"{key}: {value:.4f}")
  hist = [h for h in result["history"] if "tokens_per_sec" in h]
  if hist:
    # The median window by processed tokens/s (the lower one of an even count): its useful
    # tokens/s, padding and MFU belong to it, so the numbers on the line agree.
    mid = sorted(hist, key=lambda h: h["tokens_per_sec"])[(len(hist) - 1) // 2]
    lines.append(f"throughput (median of {len(hist)} logged windows): "
                 f"{mid['tokens_per_sec']:.0f} tokens/s processed, "
                 f"{mid['useful_tokens_per_sec']:.0f} useful (non-pad; "
                 f"{100 * mid['padding_fraction']:.1f}% padding), MFU "
                 f"{100 * mid['mfu']:.2f}% of {result['peak_flops'] / 1e9:.0f} GFLOP/s "
                 f"({result['peak_flops_source']}); train step compiled in "
                 f"{result['compile_time']:.1f} s")
  wd = epath.Path(result["workdir"])
  rows = "metrics-*.jsonl" if "://" in os.fspath(wd) else "metrics.jsonl"  # MetricWriter
  lines += [f"checkpoints: {wd / 'checkpoints'}", f"metrics: {wd / rows} "
            f"(TensorBoard: {wd / 'tensorboard'})", f"loss curve: {wd / 'loss.png'}"]
  return "\n".join(lines)



_DISK_FULL = re.compile(r"No space left on device|File too large|Disk quota exceeded|"
                        r"os_error_code='(28|27|122)'")


def disk_full_error(error: BaseException, workdir: str) -> str | None:
  """One line for a write that failed on a full disk or past ``ulimit -f`` (Orbax and
  TensorStore report it as a ValueError with the errno in its text), else None."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
      reason = error.strerror or str(error)
      break
    match = _DISK_FULL.search(str(error))
    if match:
      reason = {"28": "No space left on device", "27": "File too large",
                "122": "Disk quota exceeded"}.get(match.group(1), match.group(0))
      break
    error = error.__cause__ or error.__context__
  else:
    return None
  try:
    steps = sorted(int(p.name) for p in (epath.Path(workdir) / "checkpoints").iterdir()
                   if p.name.isdigit())
  except OSError:
    steps = []
  kept = (f"the checkpoints committed before are kept (latest: step {steps[-1]})" if steps
          else "no checkpoint had been committed")
  return (f"workdir={workdir!r}: disk full / file size limit ({reason}) while writing; {kept}; "
          "free space (or raise `ulimit -f`) and run the same command to resume")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for handler in py_logging.getLogger().handlers + [logging.get_absl_handler()]:
    handler.addFilter(_QuietOrbax())
  sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
  from xlps import sweep
  sweep.exit_with_parent()  # a sweep's point: stop (saving) when the sweep process dies
  import jax
  if _DISTRIBUTED.value or _COORDINATOR.value:
    from xlps import distributed
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
    app.install_exception_handler(distributed.ExitOnError())  # no 300 s shutdown wait
  from xlps import train
  try:
    result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except train.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except Exception as e:  # a write to a full disk (or past `ulimit -f`): one line, not a trace
    message = disk_full_error(e, _WORKDIR.value)
    if message is None:
      raise
    # Orbax's failed save leaves TensorStore writes running whose callbacks print "Event loop
    # is closed" traces during interpreter shutdown: exit at once so this line stays last.
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)
  if jax.process_index() == 0 and result["history"]:
    plot_losses(result["history"], epath.Path(result["workdir"]) / "loss.png",
                result["unigram_entropy"])
    print(report(result))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=lambda argv: config_lib.parse_config_flags(argv, _CONFIG))
