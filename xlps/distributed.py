"""Multi-process failure handling: a dead peer ends the job, SIGTERM stops every process at
one step.

- ``initialize`` calls ``jax.distributed.initialize`` with a heartbeat timeout: the
  coordination service (in process 0) declares a process dead when it has sent no heartbeat
  for that long, and every other process then aborts (SIGABRT, exit status 134) with JAX's
  ``Terminating process because the JAX distributed service detected fatal errors. This most
  likely indicates that another task died`` in its log, instead of waiting forever in a
  collective (gloo, the CPU collectives, notices a dead peer only when a read was under way:
  'Connection reset by peer'; else it waits). Heartbeats come from a C++ thread: a long
  compile, a slow step or the GIL do not delay them. Measured on 2 CPU processes with a 10 s
  timeout: 0.1 to 11 s from SIGKILL to the survivor's exit (under 1 s when process 0, the
  coordinator, dies: the others' next RPC fails).
- ``ExitOnError`` (an absl exception handler, for ``launch.train``) makes a process whose
  main raises exit at once with status 1: a normal exit would wait in jax's shutdown
  barrier for the others, which wait in a collective for it, until jax's shutdown timeout
  (300 s). Its heartbeats stop instead, and the others abort as above. ``sys.exit`` in one
  process only is not covered (it still waits in the shutdown barrier).
- ``StopOnSigterm`` turns SIGTERM (preemption) into a stop before some step. With one
  process it is a Python signal handler. With several, processes see the signal at
  different steps (or only some of them get it), and leaving the loop at different steps
  deadlocks the next collective or the checkpoint barrier. JAX's preemption sync manager
  (``multihost_utils.reached_preemption_sync_point``, started by
  ``jax.distributed.initialize``) solves exactly this: its C++ SIGTERM handler posts a
  notice in the coordination service, every process reports the last step it asked about,
  and the sync point is the largest of them plus one; asking about every step costs a
  mutex, no communication. Orbax's ``CheckpointManager.save`` asks the same manager about
  the steps it saves (absolute step numbers), so ``StopOnSigterm`` asks about absolute
  steps too. Only one process needs the signal. Known gap: a SIGTERM before
  ``StopOnSigterm`` is created (start-up) gets sync point 1, which a resumed run (start > 0)
  never reaches, so it is ignored and the job runs on until it is killed.

The training loop uses it as::

    stop = distributed.StopOnSigterm(step)        # the step the loop starts from
    try:
      while step < num_steps and not stop(step):  # every process leaves at one step
        ...
      if stop.stopped: save a final checkpoint
    finally:
      stop.close()
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

import jax
from absl import app
from absl import logging
from jax.experimental import multihost_utils

# A process silent for this long is declared dead and the others abort (jax's own default is
# 100 s). Heartbeats are sent from a C++ thread every fraction of it, so the bound is about
# this, whatever the training loop does.
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 60


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               heartbeat_timeout_seconds: int = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS) -> None:
  """``jax.distributed.initialize`` (arguments from the cluster's environment where None)
  with ``heartbeat_timeout_seconds``: a process that dies (or hangs its host) ends every
  other process within about that many seconds, with a non-zero exit status."""
  if heartbeat_timeout_seconds < 1:
    raise ValueError(f"heartbeat_timeout_seconds={heartbeat_timeout_seconds} must be >= 1")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  logging.info("process %d of %d; if a process dies (no heartbeat for %d s), the others "
               "abort", jax.process_index(), jax.process_count(), heartbeat_timeout_seconds)


class ExitOnError(app.ExceptionHandler):
  """Prints the traceback and ends the process at once (``os._exit(1)``), skipping jax's
  shutdown barrier (see the module docstring). Install it after ``initialize``:
  ``app.install_exception_handler(distributed.ExitOnError())``."""

  def handle(self, exc: BaseException) -> None:
    traceback.print_exception(exc)
    hint = ""
    if isinstance(exc, jax.errors.JaxRuntimeError):
      hint = (" A runtime error in a multi-process job (e.g. 'Gloo ... failed: Connection reset "
              "by peer') most often means another process died first: see the other logs.")
    logging.error("process %d of %d failed (%s); exiting now with status 1 so that the "
                  "other processes stop too.%s", jax.process_index(), jax.process_count(),
                  type(exc).__name__, hint)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _sync_manager_running() -> bool:
  """Whether JAX's preemption sync manager runs (``jax.distributed`` initialized with the
  default ``jax_enable_preemption_service=True``)."""
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class StopOnSigterm:
  """``stop(step)``: whether to stop before training step ``step + 1``; the same answer at
  the same step on every process. ``stopped`` stays True once it was.

  Create it with the step the loop starts from, right after restoring a checkpoint and
  before the loop: every process must then ask about every step in order (all processes
  start from the same step). Without ``jax.distributed`` (one process) it installs a Python
  SIGTERM handler, which ``close()`` removes; with it, JAX's C++ SIGTERM handler (installed
  by ``jax.distributed.initialize``) must stay in place, so no Python handler is installed
  for SIGTERM anywhere in a multi-process run.
  """

  def __init__(self, step: int):
    self.stopped = False
    self.synced = _sync_manager_running()
    self._previous = None
    self._signal = None
    if self.synced:
      # Report the start step at once: the manager's counter starts at 0, and a notice
      # answered with sync point 1 would never be reached by a resumed run.
      self(step)
    else:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    self._signal = signum

  def __call__(self, step: int) -> bool:
    if not self.stopped:
      if self.synced:
        self.stopped = multihost_utils.reached_preemption_sync_point(step)
      else:
        self.stopped = self._signal is not None
      if self.stopped:
        logging.warning("SIGTERM: stopping at step %d%s", step,
                        " (the step all processes agreed on)" if self.synced else "")
    return self.stopped

  def close(self) -> None:
    """Restores the SIGTERM handler that was there before (one-process runs)."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
