"""One run per workdir: an exclusive ``flock`` on ``WORKDIR/xlps.lock`` for a run's lifetime.

Two ``launch.train`` processes in one workdir would both train and write every metrics row
twice; two ``launch.sweep`` processes would train every point twice. The lock file holds
the holder's pid, host, kind and start time, so the one refused can say who holds it. The
kernel drops the lock when its holder exits, however it exits (SIGKILL included), so a
stale file never blocks: only its text stays, describing the last holder.

Object stores (``gs://``) have no file locks: such workdirs are not locked (a warning says
so). Filesystems without ``flock`` (some network mounts) are not locked either, with a
warning naming the error.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
from collections.abc import Iterator

from absl import logging

from xlps.config import ConfigError

try:
  import fcntl
except ImportError:  # Windows: no flock
  fcntl = None

LOCK_FILE = "xlps.lock"


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, what: str, process_index: int = 0,
         process_count: int = 1) -> Iterator[None]:
  """Holds ``WORKDIR/xlps.lock`` for the ``with`` block, ``what`` (``launch.train``) naming
  this process in it; raises ConfigError naming the holder when another process has it.

  In a multi-process run process 0 takes the lock and every process learns whether it got
  it (all raise alike). The workdir must exist.
  """
  text = os.fspath(workdir)
  fd, refused = None, None
  if process_index == 0:
    fd, refused = _take(text, what)
  if process_count > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    if not multihost_utils.broadcast_one_to_all(np.int32(refused is None)):
      refused = refused or (f"workdir={text!r} is in use by another run (process 0 found "
                            f"{os.path.join(text, LOCK_FILE)} locked; its log names the holder)")
  if refused:
    raise ConfigError(refused)
  try:
    yield
  finally:
    if fd is not None:
      os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)


def _take(workdir: str, what: str) -> tuple[int | None, str | None]:
  """``(fd, None)`` holding the lock (fd None where no lock can be taken, with a warning),
  or ``(None, message)`` naming the process that holds it."""
  if "://" in workdir or fcntl is None:
    logging.warning("workdir=%r is not locked against a second run (%s): start one run per "
                    "workdir", workdir, "an object store has no file locks" if "://" in workdir
                    else "no fcntl.flock on this platform")
    return None, None
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      message = (f"workdir={workdir!r} is in use by {_holder(fd, path)}: two runs in one "
                 "workdir would both write it. Wait for that run to end (or stop it), or use "
                 "another --workdir")
      os.close(fd)
      return None, message
    logging.warning("workdir=%r is not locked against a second run: flock on %s failed (%s): "
                    "start one run per workdir", workdir, path, e.strerror or e)
    os.close(fd)
    return None, None
  since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                            "since": since}).encode(), 0)
  return fd, None


def _holder(fd: int, path: str) -> str:
  """``launch.train (pid 123 on host h, since <UTC time>)`` from the lock file's text."""
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode())
    return f"{info['what']} (pid {info['pid']} on host {info['host']}, since {info['since']})"
  except (ValueError, KeyError, TypeError, UnicodeDecodeError):
    return f"another process (it has not yet written its pid into {path})"
