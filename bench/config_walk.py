"""The walk a newcomer makes following ``config`` from ``train_and_evaluate``: which modules
it passes through, and how often it comes back to a module it had left.

Runs ``configs/default.py:runlocal`` for two steps under ``sys.setprofile`` and records,
in the order of their first calls, every xlps function called with the config or one of
its sections (``model``, ``data``, ``train``, ``mesh``) as an argument: the functions a
reader follows, each read once. Consecutive functions of one module are one visit; a
return is a visit to a module visited before.

  python -m bench.config_walk
  python -m bench.config_walk --out=bench/config_walk.md
"""

from __future__ import annotations

import sys
import tempfile

from absl import flags

from bench import harness

_OUT = flags.DEFINE_string("out", None, "Also write the report to this file.")


def walk(config, workdir: str) -> list[str]:
  """Modules visited (in call order, consecutive repeats merged) while training ``config``."""
  from xlps import train
  followed = {id(config), *(id(config[s]) for s in ("model", "data", "train", "mesh"))}
  visits: list[str] = []
  seen: set = set()

  def profile(frame, event, arg):
    if event != "call":
      return
    module, code = frame.f_globals.get("__name__", ""), frame.f_code
    if not module.startswith("xlps") or code in seen:
      return
    names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    if any(id(frame.f_locals.get(n)) in followed for n in names):
      seen.add(code)
      if not visits or visits[-1] != module:
        visits.append(module)

  sys.setprofile(profile)
  try:
    train.train_and_evaluate(config, workdir)
  finally:
    sys.setprofile(None)
  return visits


def main(argv: list[str]) -> None:
  del argv
  from configs import default
  config = default.get_config("runlocal")
  with tempfile.TemporaryDirectory() as tmp:
    config.data.data_dir = f"{tmp}/data"
    config.train.num_steps = 2
    config.train.decay_steps = 2
    config.train.warmup_steps = 1
    config.train.eval_every_steps = 2
    config.data.eval_batches = 1
    visits = walk(config, f"{tmp}/workdir")
  returns = sum(module in visits[:i] for i, module in enumerate(visits))
  lines = [f"Command: `{harness.command()}`", "", f"{len(set(visits))} modules, {len(visits)} visits, {returns} returns to a module "
           "already left", "", " -> ".join(visits)]
  harness.report("\n".join(lines), _OUT.value)


if __name__ == "__main__":
  harness.run(main)
