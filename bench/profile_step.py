"""Where a training step's time goes: a ``jax.profiler`` trace mapped onto the compiled HLO.

Compiles the same step as ``bench.step_vs_torch`` (``--workload=albert|decoder``), runs
``--steps`` steps under ``jax.profiler.trace`` (perfetto JSON), and sums the duration of
every XLA:CPU thunk by its HLO instruction (``args.hlo_op``). Each instruction is put in
one category from the optimized HLO (its opcode, the ops of its fused computation, and
the JAX ``op_name`` metadata, which carries the Flax module path):

- ``matmul``: anything that contains a dot (YNNPACK / Eigen fusions included), split into
  attention scores/values, layer projections and FFN, and the vocabulary output;
- ``attention softmax/masking``: non-matmul ops under an ``attention`` module path;
- ``layout copies``: copy / transpose (alone or as a whole fusion);
- ``scan slicing``: dynamic-slice / dynamic-update-slice / gather of the depth scan (slot
  gathers, saved per-layer residuals, stacked gradients);
- ``optimizer and metrics``: ops outside the model's forward/backward (AdamW, clipping,
  gradient norm, metric sums);
- ``elementwise``: the rest (norms, GELU, residual adds, embedding, loss).

Container thunks (while, call, conditional) are not counted, so shares are of leaf-op time.
``host overhead`` is the step's wall time not covered by any thunk of the step; minor page
faults and system CPU time per (untraced) step show how much of it is the kernel mapping
fresh pages for XLA's temp buffer.
``compiled.cost_analysis()`` FLOPs are printed for comparison: XLA counts a while loop's
body once, so they undercount the scanned depth N-fold.

    .venv/bin/python -m bench.profile_step --workload=albert --out=bench/profile_albert.md
    .venv/bin/python -m bench.profile_step --workload=albert --set=remat_policy=dots_saveable \
        --out=bench/profile_albert_dots.md
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import resource
import tempfile

from absl import flags

from bench import harness, workloads

_WORKLOAD = flags.DEFINE_enum("workload", "albert", list(workloads.SHAPES),
                              "Workload of bench.step_vs_torch.")
_STEPS = flags.DEFINE_integer("steps", 3, "Traced steps (and as many untraced ones).")
_SET = flags.DEFINE_multi_string("set", [], "Model key=value overrides (e.g. "
                                 "remat_policy=full); repeat for several.")
_OUT = flags.DEFINE_string("out", "", "Also write the markdown report here.")

INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?\s([a-z][\w\-]*)\((.*)$")
COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
CATEGORIES = ("matmul: attention scores/values", "matmul: projections and FFN",
              "matmul: vocabulary output", "attention softmax/masking", "layout copies",
              "scan slicing", "optimizer and metrics", "elementwise")


def parse_hlo(text: str) -> tuple[dict, dict]:
  """(instruction -> (opcode, called computation, op_name), computation -> its opcodes)."""
  instrs, comps, current = {}, collections.defaultdict(set), None
  for line in text.splitlines():
    m = COMP.match(line)
    if m and line.rstrip().endswith("{"):
      current = m.group(1)
      continue
    m = INSTR.match(line)
    if not m:
      continue
    name, opcode, rest = m.groups()
    calls = re.search(r"calls=%([\w.\-]+)", rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    instrs[name] = (opcode, calls.group(1) if calls else None, op_name.group(1) if op_name else "")
    if current:
      comps[current].add(opcode)
  return instrs, comps


def category(name: str, instrs: dict, comps: dict) -> str | None:
  opcode, calls, op_name = instrs.get(name, ("?", None, ""))
  if opcode in ("while", "call", "conditional"):
    return None
  inner = comps.get(calls, set()) if calls else {opcode}
  model = "jvp(" in op_name
  if "dot" in inner or "convolution" in inner or "custom-call" in inner:
    projection = any(f"/{name}/" in op_name for name in ("query", "key", "value", "out"))
    if "attention/" in op_name and not projection:
      return "matmul: attention scores/values"
    if "/block/" in op_name or "/layers/" in op_name or "/encoder/" in op_name or \
        "/decoder/" in op_name:
      return "matmul: projections and FFN"
    return "matmul: vocabulary output" if model else "optimizer and metrics"
  if not model:
    return "optimizer and metrics"
  if inner <= {"copy", "transpose", "bitcast", "parameter"}:
    return "layout copies"
  if inner & {"dynamic-slice", "dynamic-update-slice", "gather", "scatter"} and \
      "while/body" in op_name:
    return "scan slicing"
  if "/attention/" in op_name or "softmax" in op_name and "/attention" in op_name:
    return "attention softmax/masking"
  return "elementwise"


def main(argv):
  del argv
  import jax
  from xlps import models, partitioning

  workload, steps = _WORKLOAD.value, _STEPS.value
  config = workloads.xlps_config(workload)
  for item in _SET.value:
    key, _, value = item.partition("=")
    old = config.model[key]
    config.model[key] = type(old)(value) if not isinstance(old, bool) else value == "True"
  spec, setup, batch, mesh, rules = workloads.xlps_setup(workload, config)
  state = setup.state
  with partitioning.activate(mesh, rules):
    compiled = setup.train_fn.lower(state, batch).compile()
    for _ in range(2):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    trace_dir = tempfile.mkdtemp(prefix="xlps_profile_")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # untraced: page faults and system time per step
    state, metrics, _ = harness.timed_steps(compiled, state, batch, steps)
    after = resource.getrusage(resource.RUSAGE_SELF)
    faults = (after.ru_minflt - usage.ru_minflt) / steps
    sys_s = (after.ru_stime - usage.ru_stime) / steps
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      state, metrics, walls = harness.timed_steps(compiled, state, batch, steps)
  instrs, comps = parse_hlo(compiled.as_text())
  path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  module = None
  per_op, per_cat, intervals = collections.Counter(), collections.Counter(), []
  for e in events:
    a = e.get("args", {})
    if e.get("ph") != "X" or "hlo_op" not in a or "train_step" not in a.get("hlo_module", ""):
      continue
    module = a["hlo_module"]
    intervals.append((e["ts"], e["ts"] + e["dur"]))
    cat = category(a["hlo_op"], instrs, comps)
    if cat is None:
      continue
    per_op[a["hlo_op"]] += e["dur"] / 1e6
    per_cat[cat] += e["dur"] / 1e6
  busy, end = 0.0, -1.0
  for s, t in sorted(intervals):
    if t > end:
      busy += t - max(s, end)
      end = t
  wall = sum(walls)
  leaf = sum(per_cat.values())
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  summary = models.summarize(spec, workloads.SEQ)
  step_flops = summary["flops_per_token"] * workloads.BATCH * workloads.SEQ
  lines = [f"# Step profile: {workload} ({module})", "",
           f"Command: `{harness.command()}`", "",
           f"{steps} traced steps, wall {wall / steps:.3f} s/step; thunks busy "
           f"{busy / 1e6 / steps:.3f} s/step (union of intervals); host overhead "
           f"{(wall - busy / 1e6) / steps:.3f} s/step; summed leaf-thunk time "
           f"{leaf / steps:.3f} s/step (> busy when thunks overlap on the 2 threads).", "",
           f"Untraced steps: {faults:,.0f} minor page faults and {sys_s:.2f} s of system CPU "
           f"time per step; XLA temp {compiled.memory_analysis().temp_size_in_bytes / 2**20:,.0f}"
           " MiB (the temp buffer is mapped afresh each step: its pages fault in again).", "",
           f"Model FLOPs/step {step_flops / 1e9:.0f} G; "
           f"`cost_analysis()` flops {cost.get('flops', 0) / 1e9:.0f} G (counts the scanned "
           "body once), bytes accessed "
           f"{cost.get('bytes accessed', 0) / 1e9:.1f} GB.", "",
           "| category | s/step | share of leaf time |", "|---|---|---|"]
  for cat in CATEGORIES:
    lines.append(f"| {cat} | {per_cat[cat] / steps:.3f} | {per_cat[cat] / leaf:.1%} |")
  lines += ["", "Top 15 instructions:", "", "| instruction | opcode | s/step | op_name |",
            "|---|---|---|---|"]
  for name, secs in per_op.most_common(15):
    opcode, _, op_name = instrs.get(name, ("?", None, ""))
    lines.append(f"| {name} | {opcode} | {secs / steps:.3f} | `{op_name[-90:]}` |")
  harness.report("\n".join(lines), _OUT.value)


if __name__ == "__main__":
  harness.run(main)
