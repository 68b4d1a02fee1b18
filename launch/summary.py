"""Prints a model's sharing plan, unique / applied parameters, training FLOPs per token and,
for generating families, the decode K/V cache bytes per token.

    python -m launch.summary --config=configs/albert.py:base
    python -m launch.summary --config=configs/albert.py:base --config.model.num_layers=48 --json
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from xlps import config as config_lib
from xlps import models

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path:arg).",
                                          lock_config=True)
_JSON = flags.DEFINE_bool("json", False, "Print exactly one JSON object on stdout.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Sequence length for attention FLOPs; "
                                "0 = config.model.max_len.")


def _short(n: float) -> str:
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.1f}{unit}"
  return str(int(n))


def _slot_text(slots: list[int], width: int = 36) -> str:
  text = " ".join(map(str, slots))
  return text if len(text) <= width else text[:width - 3] + "..."


def format_table(summary: dict, spec) -> str:
  lines = [f"xlps model summary: {spec.family}, d_model {spec.d_model}, E {spec.embed_dim}, "
           f"heads {spec.num_heads} (kv {spec.num_kv_heads}), d_ff {spec.d_ff}, "
           f"vocab {spec.vocab_size}"]
  header = f"{'component':<26}{'slots':>6}{'applied':>9}{'unique params':>16}" \
           f"{'applied params':>16}  slot table"
  lines += [header, "-" * len(header)]
  tables = summary["slots"]
  for row in summary["components"]:
    table = tables.get(row["component"], [])
    if not table and row["component"] != "other":  # tied enc-dec: same slots both sides
      table = tables.get(f"encoder/{row['component']}", [])
    lines.append(f"{row['component']:<26}{row['slots']:>6}{row['applications']:>9}"
                 f"{row['unique_params']:>16,}{row['applied_params']:>16,}  "
                 f"{_slot_text(table)}")
  lines.append("-" * len(header))
  u, a = summary["unique_params"], summary["applied_params"]
  lines.append(f"{'total':<41}{u:>16,}{a:>16,}")
  lines.append(f"unique params {_short(u)}, applied (unrolled-equivalent) {_short(a)} "
               f"({a / u:.2f}x)")
  lines.append(f"training FLOPs per token at seq_len {summary['seq_len']}: "
               f"{summary['flops_per_token']:,} ({_short(summary['flops_per_token'])}; "
               f"6 x {summary['applied_matmul_params']:,} applied matmul params + attention)")
  adapters = sum(row.get("adapter_params", 0) for row in summary["components"])
  if spec.lora is not None:
    lines.append(f"LoRA rank {spec.lora.rank} per applied layer on {', '.join(spec.lora.targets)}"
                 f"{' (+ bias offsets)' if spec.lora.bias else ''}: {adapters:,} adapter params "
                 "(in the unique counts; each applied once)")
  depth = summary.get("adaptive_depth")
  if depth and "routing" in depth:
    expected = (f"expected {depth['expected_train_iterations']:.2f} of "
                f"{depth['max_iterations']} iterations per position: "
                f"{depth['expected_train_flops_per_token']:,.0f} FLOPs/token applied"
                if "expected_train_iterations" in depth else
                "mean iterations per position: the train_depth / eval_depth logs")
    lines.append(f"recursion routing ({depth['routing']}): {expected} (the masked scan runs "
                 "all N layers; FLOPs/token per layer: "
                 f"{', '.join(f'{k} {v:,}' for k, v in depth['layer_flops_per_token'].items())})")
  elif depth and "expected_train_iterations" in depth:
    lines.append(f"looped depth: {depth['train_iterations']} train iterations (expected "
                 f"{depth['expected_train_iterations']:.2f} of {depth['max_iterations']}): "
                 f"{depth['expected_train_flops_per_token']:,.0f} FLOPs/token applied in "
                 f"training, {depth['eval_flops_per_token']:,} at eval_iterations "
                 f"{depth['eval_iterations']} (the masked scan runs all N layers)")
  elif depth:
    lines.append("ACT: applied FLOPs/token = FLOPs/token - (N - mean N(t)) x "
                 f"{depth['layer_flops_per_token']} per stack layer (mean N(t): the ponder logs)")
  cache = summary.get("kv_cache")
  if cache:
    lines.append(f"decode K/V cache ({cache['policy']}): {cache['entries']} entries for "
                 f"{cache['applied_layers']} applied layers, {cache['bytes_per_token']:,} bytes "
                 f"per token (2 x {cache['entries']} x {spec.num_kv_heads} kv heads x "
                 f"{spec.head_dim} x {spec.dtype} + 1 validity byte)")
    if "cross_entries" in cache:
      lines.append(f"cross-attention K/V cache: {cache['cross_entries']} entries (one per "
                   f"cross-attention slot), {cache['cross_bytes_per_source_token']:,} bytes per "
                   "source token")
  return "\n".join(lines)



def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  try:
    spec = models.spec_of(config)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  summary = models.summarize(spec, _SEQ_LEN.value or None)
  if _JSON.value:
    print(json.dumps(summary))
  else:
    print(format_table(summary, spec))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=lambda argv: config_lib.parse_config_flags(argv, _CONFIG))
