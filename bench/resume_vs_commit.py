"""Resume across a refactor: a checkpoint written by another commit's code restores and
continues with the working tree's code exactly as that commit's code continues it.

Per config (tiny models, a few steps on the stdlib byte corpus), with ``--commit`` checked
out into a temporary ``git worktree``:

1. the commit's code trains to step ``--resume_at`` (``python -m launch.train`` run in the
   worktree, so its ``xlps``, ``launch`` and ``configs`` are imported; checked once per
   tree by printing ``xlps.__file__``);
2. that workdir is copied three times and each copy continued to ``--steps`` with the same
   flags but ``train.num_steps``: by the commit's code (the reference), by the working
   tree's code, and by the commit's code again (a control: the reference is reproducible);
   ``train.decay_steps`` is fixed, so every run follows one schedule;
3. compared with the reference: every metrics.jsonl row after the resume step in every key
   but the wall-time rates (``WALL_KEYS``; keys logged by one side only are listed), and
   the final checkpoint's params (and the whole train state: optimizer moments, step, RNG
   key) leaf by leaf with ``np.array_equal``, else max |diff| and its size in ulps.

A continuation that fails (e.g. the restore refuses the old checkpoint) is reported with
its traceback, not worked around.

    python -m bench.resume_vs_commit --commit=1caac0f --out=bench/resume_vs_commit.md
    python -m bench.resume_vs_commit --commit=1caac0f --configs=tied,act
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging

from bench import harness

_COMMIT = flags.DEFINE_string("commit", None, "The git commit whose code writes the checkpoint.")
_CONFIGS = flags.DEFINE_list("configs", [], "Config names to run (default: all of CONFIGS).")
_RESUME_AT = flags.DEFINE_integer("resume_at", 2, "The step the commit's code trains to.")
_STEPS = flags.DEFINE_integer("steps", 4, "The step both continuations train to.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir (default: a temporary one; "
                                "the stdlib dataset is built there on first use).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the worktree's workdirs (their path is printed).")
_OUT = flags.DEFINE_string("out", "", "Markdown report to write (besides stdout).")

ROOT = pathlib.Path(harness.ROOT)
# The rates of a metrics row that depend on wall time (xlps.metrics.Throughput.report);
# every other key (losses, accuracy, grad_norm, learning_rate, padding, eval_*, the depth
# controllers' metrics) must be equal. (bench.kill_resume's ROW_KEYS is a fixed list without
# the controllers' keys, and importing that module defines its --out/--data_dir flags.)
WALL_KEYS = ("steps_per_sec", "tokens_per_sec", "useful_tokens_per_sec", "mfu")
_LOOP = {"model.num_layers": 8, "model.loop.prelude": 1, "model.loop.core": 2,
         "model.loop.coda": 1}
# name -> (config file:arg, overrides).
CONFIGS: dict[str, tuple[str, dict]] = {
    "tied": ("configs/default.py:runlocal", {}),
    "loop_adapter": ("configs/default.py:runlocal",
                     {**_LOOP, "model.loop.inject": "adapter",
                      "model.loop.train_iterations": "uniform", "model.loop.mean_iterations": 2}),
    "act": ("configs/default.py:runlocal",
            {"model.act.enabled": True, "model.sharing.num_unique": 1}),
    "mor_token": ("configs/recursive.py:mor_token,runlocal", {}),
    "mor_expert": ("configs/recursive.py:mor_expert,runlocal", {}),
}


# bench.numerics_vs_commit's cases of each config's depth method.
NUMERICS_CASES = {"loop_adapter": ("loop_adapter_random",),
                  "act": ("act_accumulate",),
                  "mor_token": ("routing_token_residual",),
                  "mor_expert": ("routing_expert_residual",)}


def overrides(data_dir: str, steps: int) -> dict:
  """tests/helpers.py short_run's small CPU run (batch 8 x 32 tokens, dropout 0.1, a row every
  step, a checkpoint every 2), with a fixed schedule length and an evaluation at --steps."""
  return {"data.data_dir": data_dir, "data.seq_len": 32, "model.max_len": 32,
          "data.eval_batches": 2, "train.num_steps": steps, "train.decay_steps": 2 * _STEPS.value,
          "train.batch_size": 8, "train.log_every_steps": 1,
          "train.checkpoint_every_steps": _RESUME_AT.value,
          "train.eval_every_steps": _STEPS.value, "model.dropout_rate": 0.1}


def train_command(name: str, workdir: pathlib.Path, data_dir: str, steps: int) -> list[str]:
  config, extra = CONFIGS[name]
  keys = {**overrides(data_dir, steps), **extra}
  return [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in keys.items())]


def _env() -> dict:
  """The children's environment: CPU, no persistent compilation cache, nothing on
  PYTHONPATH (the current directory, i.e. the tree, comes first on sys.path)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COMPILATION_CACHE_DIR", "PYTHONPATH")}
  env["JAX_PLATFORMS"] = "cpu"
  return env


def imported_from(tree: pathlib.Path) -> str:
  """Where ``xlps`` comes from in a child started with cwd ``tree`` (as launch.train is)."""
  done = subprocess.run([sys.executable, "-c", "import xlps, launch.train; print(xlps.__file__)"],
                        cwd=tree, env=_env(), capture_output=True, text=True, check=True)
  return done.stdout.strip().splitlines()[-1]


def train(name: str, tree: pathlib.Path, workdir: pathlib.Path, data_dir: str,
          steps: int) -> dict:
  start = time.time()
  done = subprocess.run(train_command(name, workdir, data_dir, steps), cwd=tree, env=_env(),
                        capture_output=True, text=True)
  resumed = re.search(r"Resumed from .* at step (\d+)", done.stderr)
  return {"rc": done.returncode, "seconds": time.time() - start, "stderr": done.stderr,
          "resumed_at": int(resumed.group(1)) if resumed else None}


def rows_after(workdir: pathlib.Path, step: int) -> list[dict]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["step"] > step]


def final_state(workdir: pathlib.Path, step: int) -> dict:
  """The train state of checkpoint ``step`` as {keystr path: numpy array}."""
  import jax
  import numpy as np

  from xlps import checkpoint as checkpoint_lib
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", async_save=False)
  try:
    state = ckpt.restore(step)[0]
  finally:
    ckpt.close()
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(state)}


def max_diff(a, b) -> tuple[float, float]:
  """(max |a - b|, that in units in the last place of the array's largest magnitude); (0, 0)
  when bitwise equal (NaNs in the same places count as equal)."""
  import numpy as np
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape or a.dtype != b.dtype:
    return float("inf"), float("inf")
  if np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
    return 0.0, 0.0
  diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
  if a.dtype.kind != "f":  # integers, PRNG key data: any difference is a real one
    return float(np.max(diff)), float("inf")
  ulp = np.spacing(max(np.max(np.abs(a)), np.max(np.abs(b))))
  return float(np.max(diff)), float(np.max(diff) / ulp)


def compare(old: pathlib.Path, new: pathlib.Path) -> dict:
  """Rows after --resume_at and the final train state of workdir ``new`` against ``old``'s."""
  old_rows, new_rows = rows_after(old, _RESUME_AT.value), rows_after(new, _RESUME_AT.value)
  key_diff: dict[str, float] = {}
  only_old, only_new = set(), set()
  for a, b in zip(old_rows, new_rows):
    only_old |= set(a) - set(b) - set(WALL_KEYS)
    only_new |= set(b) - set(a) - set(WALL_KEYS)
    for k in (set(a) & set(b)) - set(WALL_KEYS) - {"step"}:
      key_diff[k] = max(key_diff.get(k, 0.0), max_diff(a[k], b[k])[0])
  old_state, new_state = final_state(old, _STEPS.value), final_state(new, _STEPS.value)
  paths = set(old_state) | set(new_state)
  leaf_diff = {p: max_diff(old_state[p], new_state[p]) for p in sorted(paths)
               if p in old_state and p in new_state}
  worst = lambda items: tuple(max(x) for x in zip((0.0, 0.0), *items))  # noqa: E731
  params = [d for p, d in leaf_diff.items() if p.startswith("['params']")]
  return {"rows": len(old_rows), "new_rows": len(new_rows),
          "row_steps": [r["step"] for r in old_rows],
          "new_row_steps": [r["step"] for r in new_rows],
          "keys": sorted(key_diff), "key_diff": key_diff,
          "only_old": sorted(only_old), "only_new": sorted(only_new),
          "leaves": len(leaf_diff), "missing_leaves": sorted(paths - set(leaf_diff)),
          "params": len(params), "param_diff": worst(params),
          "state_diff": worst(leaf_diff.values()),
          "differing": sum(d[0] != 0 for d in leaf_diff.values()),
          "worst_leaves": sorted(((d, p) for p, d in leaf_diff.items() if d[0]),
                                 reverse=True)[:5]}


def run_config(name: str, worktree: pathlib.Path, root: pathlib.Path, data_dir: str) -> dict:
  """The commit's code to --resume_at, then three copies continued to --steps: by the
  commit's code (``old``), the working tree's (``new``) and the commit's again (``control``:
  is the reference itself reproducible?)."""
  base = root / name / "base"
  result = {"name": name, "first": train(name, worktree, base, data_dir, _RESUME_AT.value)}
  if result["first"]["rc"] != 0:
    return result
  for side, tree in (("old", worktree), ("new", ROOT), ("control", worktree)):
    shutil.copytree(base, root / name / side)
    result[side] = train(name, tree, root / name / side, data_dir, _STEPS.value)
  if result["old"]["rc"] == 0:
    for side in ("new", "control"):
      if result[side]["rc"] == 0:
        result[f"cmp_{side}"] = compare(root / name / "old", root / name / side)
  return result


SIDES = ("first", "old", "new", "control")


def _fmt(d: tuple[float, float]) -> str:
  if d[0] == 0:
    return "bitwise"
  return f"max diff {d[0]:.3g}" + (f" ({d[1]:.2g} ulp)" if d[1] != float("inf") else "")


def _same(c: dict) -> bool:
  return (c["row_steps"] == c["new_row_steps"] and not c["only_old"] and not c["only_new"]
          and not any(c["key_diff"].values()) and not c["state_diff"][0]
          and not c["missing_leaves"])


def _row(r: dict) -> str:
  name = r["name"]
  if r["first"]["rc"] != 0:
    return f"| {name} | FIRST RUN FAILED (old code, exit {r['first']['rc']}) | | | | | |"
  failed = [s for s in ("old", "new", "control") if r[s]["rc"] != 0]
  if "old" in failed or "new" in failed:
    return (f"| {name} | CONTINUATION FAILED ({', '.join(failed)} code, exit "
            f"{', '.join(str(r[s]['rc']) for s in failed)}) | | | | | |")
  c = r["cmp_new"]
  resumed = "/".join(str(r[s]["resumed_at"]) for s in ("old", "new"))
  steps = f"{c['rows']} (steps {', '.join(map(str, c['row_steps']))})"
  if c["row_steps"] != c["new_row_steps"]:
    steps += f" vs steps {c['new_row_steps']}: NO"
  worst = max(c["key_diff"].values(), default=0.0)
  keys = f"yes ({len(c['keys'])} keys)" if worst == 0 else f"NO (max diff {worst:.3g})"
  if c["only_old"]:
    keys += f"; MISSING in new: {', '.join(c['only_old'])}"
  if c["only_new"]:
    keys += f"; new only: {', '.join(c['only_new'])}"
  state = _fmt(c["state_diff"]) + (f", {c['differing']}/{c['leaves']} leaves differ"
                                   if c["differing"] else f" ({c['leaves']} leaves)")
  if c["missing_leaves"]:
    state += f", MISSING/EXTRA {c['missing_leaves'][:4]}"
  control = ("failed" if r["control"]["rc"] != 0 else
             "bitwise" if _same(r["cmp_control"]) else "DIFFERS")
  return (f"| {name} | {resumed} | {steps} | {keys} | {_fmt(c['param_diff'])} "
          f"({c['params']} arrays) | {state} | {control} |")


def report(results: list[dict], commit: str, head: str, dirty: list[str], where: dict,
           seconds: float) -> str:
  lines = [
      "# Resume across a refactor: a checkpoint of another commit, continued by this tree",
      "", "    " + harness.command(), "",
      f"Checkpoint written at step {_RESUME_AT.value} by commit {commit} (`git worktree`); "
      f"continued to step {_STEPS.value} by that commit's code (reference), by the working "
      f"tree (HEAD {head}"
      + (f", with uncommitted changes to {', '.join(dirty)}" if dirty else "") + ") and, as a "
      f"control, by the commit's code again. Each run: batch 8 x 32 tokens, dropout 0.1, a "
      f"metrics row every step, a checkpoint every {_RESUME_AT.value}, an evaluation at step "
      f"{_STEPS.value}, train.decay_steps={2 * _STEPS.value} in every run (one schedule). "
      f"{len(results)} configs in {seconds / 60:.1f} min on {os.cpu_count()} CPU cores.", "",
      "xlps imported by the runs: " + "; ".join(f"{k} code: `{v}`" for k, v in where.items()),
      "", "Rows: every metrics.jsonl key after the resume step but the wall-time rates ("
      + ", ".join(WALL_KEYS) + "), the working tree's against the commit's. Params: the "
      "final checkpoint's `params`; whole state: every leaf of the train state (params, AdamW "
      "moments and count, step, RNG key); ulp: the largest difference in units in the last "
      "place (float32) of the array's largest magnitude. Control: the commit's second "
      "continuation against its first (rows and state).", "",
      "| config | resumed at (old/new) | rows compared | keys equal? | params | whole state "
      "| control |", "|---|---|---|---|---|---|---|", *map(_row, results), "",
  ]
  inexact = [r for r in results if r.get("cmp_new") and not _same(r["cmp_new"])
             and r.get("cmp_control") and _same(r["cmp_control"])]
  if inexact:
    cases = sorted({case for r in inexact for case in NUMERICS_CASES.get(r["name"], ())})
    lines += [
        "Not bitwise: " + ", ".join(
            f"{r['name']} (params {_fmt(r['cmp_new']['param_diff'])}, rows "
            + ("equal" if not any(r["cmp_new"]["key_diff"].values()) else "differ") + ")"
            for r in inexact) + ". The restore itself succeeded (the runs resumed at step "
        f"{_RESUME_AT.value}) and the commit's own second continuation is bitwise equal to its "
        "first, so the difference comes from what the working tree's code computes after the "
        "resume, not from the checkpoint. The one-step numbers of the same depth methods, "
        "without any checkpoint:"
        + (f" `python -m bench.numerics_vs_commit --commit={commit} --cases={','.join(cases)}`"
           if cases else " `python -m bench.numerics_vs_commit --commit=" + commit + "`")
        + ".", ""]
  for r in results:
    config, extra = CONFIGS[r["name"]]
    flags_ = " ".join(f"--config.{k}={v}" for k, v in extra.items())
    lines.append(f"- `{r['name']}`: `--config={config}" + (f" {flags_}" if flags_ else "")
                 + "`")
    c = r.get("cmp_new")
    if c:
      lines.append(f"  - keys compared: {', '.join(c['keys'])}")
      diffs = {k: d for k, d in c["key_diff"].items() if d}
      if diffs:
        lines.append("  - row keys that differ (max |diff|): "
                     + ", ".join(f"{k} {d:.3g}" for k, d in sorted(diffs.items())))
      if c["worst_leaves"]:
        lines.append("  - largest leaf differences: "
                     + ", ".join(f"`{p}` {_fmt(d)[9:]}" for d, p in c["worst_leaves"]))
    secs = ", ".join(f"{s} {r[s]['seconds']:.0f} s" for s in SIDES if s in r)
    lines.append(f"  - run times: {secs}")
    for side in SIDES:
      if side in r and r[side]["rc"] != 0:
        lines += [f"  - the {side} run failed with exit {r[side]['rc']}; stderr tail:", "",
                  "```", r[side]["stderr"][-5000:].rstrip(), "```", ""]
  return "\n".join(lines)


def main(argv):
  del argv
  if not _COMMIT.value:
    raise app.UsageError("--commit is required (e.g. --commit=1caac0f)")
  names = _CONFIGS.value or list(CONFIGS)
  unknown = [n for n in names if n not in CONFIGS]
  if unknown:
    raise app.UsageError(f"--configs: unknown {unknown}; valid: {', '.join(CONFIGS)}")
  if not 0 < _RESUME_AT.value < _STEPS.value:
    raise app.UsageError("need 0 < --resume_at < --steps")
  logging.set_verbosity(logging.WARNING)  # Orbax's INFO lines of the final restores
  git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, check=True, capture_output=True,  # noqa: E731
                                  text=True).stdout
  commit = git("rev-parse", "--short", _COMMIT.value + "^{commit}").strip()
  head = git("rev-parse", "--short", "HEAD").strip()
  dirty = sorted({line[3:] for line in git("status", "--porcelain", "--", "xlps", "launch",
                                           "configs").splitlines() if line.strip()})
  t0 = time.time()
  root = pathlib.Path(tempfile.mkdtemp(prefix="xlps_resume_vs_commit_"))
  worktree = root / "tree"
  subprocess.run(["git", "worktree", "add", "--detach", str(worktree), commit], cwd=ROOT,
                 check=True, capture_output=True)
  try:
    where = {"old": imported_from(worktree), "new": imported_from(ROOT)}
    for side, tree in (("old", worktree), ("new", ROOT)):
      if not where[side].startswith(str(tree) + os.sep):  # e.g. the editable install's
        raise RuntimeError(f"the {side} runs import xlps from {where[side]}, not {tree}")
    where = {"old": where["old"].replace(str(root), "<tmp>"),
             "new": os.path.relpath(where["new"], ROOT)}
    data_dir = _DATA_DIR.value or str(root / "tfds")
    results = []
    for name in names:
      r = run_config(name, worktree, root, data_dir)
      results.append(r)
      print(_row(r), flush=True)
    text = report(results, commit, head, dirty, where, time.time() - t0)
  finally:
    subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT,
                   check=False)
    if _KEEP.value:
      print(f"workdirs kept in {root}")
    else:
      shutil.rmtree(root, ignore_errors=True)
  harness.report(text, _OUT.value)


if __name__ == "__main__":
  harness.run(main)
