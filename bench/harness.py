"""What every bench script shares: its absl entry point, measurements in fresh processes,
timed steps, medians, and the report (its command line first, then stdout and ``--out``).

A script defines its flags with ``flags.DEFINE_*``, has its exact command in its docstring
(``python -m bench.NAME --flag=value``, run from the repository root) and ends with

    if __name__ == "__main__":
      harness.run(main)              # harness.run(main, cpu_devices=8): 8 fake CPU devices

Nothing here imports jax at module level, so a child process can put another source tree's
``xlps`` first on its path before anything imports it.
"""

import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = flags.DEFINE_string(
    "child", "", "Internal: the JSON call of one measurement, made in this process and printed "
    "as one JSON line (the script re-runs itself with it; see bench.harness.child).")


def run(main: Callable[[list[str]], Any], *, cpu_devices: int = 0) -> None:
  """``app.run(main)``: parses the flags, refuses positional arguments and, under ``--child``,
  makes that one measurement instead of calling ``main``. ``cpu_devices`` > 0 gives this
  process that many fake CPU devices (``--xla_force_host_platform_device_count``, JAX on CPU);
  it works as long as nothing has asked jax for a device yet."""
  if cpu_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={cpu_devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

  def entry(argv: list[str]):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CHILD.value:
      return _serve_child(json.loads(_CHILD.value))
    return main(argv)

  app.run(entry)


def module_name() -> str:
  """The running script as a module: ``bench.NAME``."""
  main = sys.modules["__main__"]
  spec = getattr(main, "__spec__", None)
  if spec is not None and spec.name != "__main__":
    return spec.name
  return "bench." + pathlib.Path(getattr(main, "__file__", sys.argv[0])).stem


def command() -> str:
  """This run's command line, as typed in the repository root (for the report's header)."""
  exe = sys.executable
  exe = os.path.relpath(exe, ROOT) if exe.startswith(ROOT + os.sep) else "python"
  return shlex.join([exe, "-m", module_name(), *sys.argv[1:]])


def child(fn: str, kwargs: dict, *, tree: str = ROOT, drop_xla_flags: bool = False) -> Any:
  """``fn(**kwargs)`` (a function of the running script) in a fresh process, its result
  through JSON. The child runs this tree's script with JAX's persistent compilation cache off
  (no ``JAX_COMPILATION_CACHE_DIR``), and imports ``xlps`` and ``configs`` from source tree
  ``tree`` (e.g. a ``git worktree`` of an older commit). ``drop_xla_flags``: without the
  caller's ``XLA_FLAGS`` either."""
  call = {"fn": fn, "kwargs": kwargs}
  if os.path.abspath(tree) != ROOT:
    call["tree"] = os.path.abspath(tree)
  cmd = [sys.executable, "-m", module_name(), f"--child={json.dumps(call)}"]
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if drop_xla_flags:
    env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
  if proc.returncode != 0:
    raise RuntimeError(f"child failed ({proc.returncode}): {shlex.join(cmd)}\n"
                       f"{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _serve_child(call: dict) -> int:
  tree = call.get("tree")
  if tree:
    if "xlps" in sys.modules:
      raise RuntimeError(f"xlps was imported before {tree} was put first on the path")
    sys.path.insert(0, tree)  # its xlps and configs from here on
  result = getattr(sys.modules["__main__"], call["fn"])(**call["kwargs"])
  print(json.dumps(result), flush=True)
  return 0


def timed_steps(step: Callable, state: Any, batch: Any, n: int) -> tuple[Any, Any, list[float]]:
  """Runs ``state, out = step(state, batch)`` ``n`` times, blocking on each step's result;
  (the last state, the last ``out``, the seconds of each step)."""
  import jax
  out, times = None, []
  for _ in range(n):
    start = time.perf_counter()
    state, out = step(state, batch)
    jax.block_until_ready((state, out))
    times.append(time.perf_counter() - start)
  return state, out, times


def median_range(values: list[float], digits: int = 2) -> str:
  """``median (min-max)``, or the value alone if there is one."""
  med = statistics.median(values)
  if len(values) == 1:
    return f"{med:.{digits}f}"
  return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def report(text: str, out: str | None) -> None:
  """Prints the report and, given ``--out``, writes it there too."""
  text = text.rstrip("\n") + "\n"
  print(text, end="")
  if out:
    pathlib.Path(out).write_text(text)
