"""bf16 MFU of a ~1B applied-parameter weight-tied decoder LM training on one GPU.

One unique layer (d_model 2048, d_ff 8192, 16 heads of 128, GELU, RMSNorm, no biases)
applied N = 20 times, vocabulary 32000 tied to the output, learned positions, sequence
2048: 1.08B applied parameters, 120M unique, 7.44 GFLOP per token. bf16 compute with
float32 master weights, gradients and loss (``model.dtype="bfloat16"``),
``model.attention_impl="auto"`` (cuDNN flash attention on NVIDIA GPUs; xlps hands it the
causal mask as a boolean (batch, 1, q, k) array, which cuDNN takes as a bias, so it also
computes the masked blocks), AdamW: the trainer's own ``xlps.train.make_steps`` /
``train_step`` / ``make_optimizer`` on a one-device mesh. Remat
``dots_with_no_batch_dims_saveable`` keeps the projections' outputs (no matmul is
recomputed) and recomputes attention and the elementwise ops. Batch 16 x 2048 should need
about 50 GB of the H200's 141 GB (saved projections ~25 GB, float32 logits and their
gradients ~15 GB, by hand count); if the step does not fit, the batch is halved until it
does (the report says which batch ran).

Reported separately: compile time (lower + XLA compile), the first step after compiling,
and the steady-state median step (after warm-up steps), with tokens/s, model FLOPs per
token (``xlps.models.summarize``: 6 x applied matmul parameters + PaLM's attention count,
no causal discount), MFU against ``xlps.metrics.peak_flops`` (H200: 989e12 bf16 dense),
``compiled.memory_analysis()`` and whether the compiled step calls cuDNN attention.
From the repository root, with xlps installed (``pip install -e .``) and a CUDA jax:

    python -m bench.gpu_mfu --out=bench/gpu_mfu.md            # on a GPU machine
    python -m bench.gpu_mfu --dry_run --out=bench/gpu_mfu.md  # CPU check of the same path
    python -m bench.gpu_mfu --batch_size=8 --remat_policy=full --steps=10

``--dry_run`` shrinks the model (d_model 64, 4 layers, vocabulary 512, sequence 64,
batch 2) and runs exactly the same code on any backend in well under a minute.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import types

import jax
import numpy as np
from absl import flags

from bench import harness
from xlps import config as config_lib
from xlps import metrics, models, partitioning, train

FULL = dict(d_model=2048, num_heads=16, d_ff=8192, num_layers=20, vocab_size=32000,
            seq_len=2048, batch_size=16)
DRY = dict(d_model=64, num_heads=4, d_ff=256, num_layers=4, vocab_size=512, seq_len=64,
           batch_size=2)

_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Shrunken model, same code path.")
_SIZES = {key: flags.DEFINE_integer(key, None, f"Default {FULL[key]} ({DRY[key]} with --dry_run).")
          for key in FULL}
_REMAT_POLICY = flags.DEFINE_enum("remat_policy", "dots_with_no_batch_dims_saveable",
                                  config_lib.REMAT_POLICIES, "model.remat_policy.")
_ATTENTION_IMPL = flags.DEFINE_enum("attention_impl", "auto", config_lib.ATTENTION_IMPLS,
                                    "model.attention_impl.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after the first.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steady-state steps.")
_OUT = flags.DEFINE_string("out", "", "Also write the markdown report here.")


def settings() -> types.SimpleNamespace:
  """The flags, sizes resolved against ``FULL`` or (``--dry_run``) ``DRY``."""
  sizes = DRY if _DRY_RUN.value else FULL
  return types.SimpleNamespace(
      dry_run=_DRY_RUN.value, remat_policy=_REMAT_POLICY.value,
      attention_impl=_ATTENTION_IMPL.value, warmup=_WARMUP.value, steps=_STEPS.value,
      out=_OUT.value, **{key: sizes[key] if flag.value is None else flag.value
                         for key, flag in _SIZES.items()})


def experiment_config(args: types.SimpleNamespace, batch_size: int):
  """The full xlps config of the benchmarked model and optimizer."""
  config = config_lib.base_config()
  m = config.model
  m.family = "decoder_lm"
  m.vocab_size, m.d_model, m.num_heads = args.vocab_size, args.d_model, args.num_heads
  m.d_ff, m.num_layers, m.max_len = args.d_ff, args.num_layers, args.seq_len
  m.norm, m.activation, m.use_bias = "rmsnorm", "gelu", False
  m.dtype, m.attention_impl, m.remat_policy = "bfloat16", args.attention_impl, args.remat_policy
  m.sharing = config_lib.sharing_config(num_unique=1)  # one layer applied N times
  config.data.seq_len = args.seq_len
  t = config.train
  t.batch_size, t.learning_rate, t.warmup_steps = batch_size, 3e-4, 10
  t.num_steps = 1 + args.warmup + args.steps
  config_lib.validate(config, num_devices=1)
  return config


def out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def measure(args: types.SimpleNamespace, batch_size: int) -> dict:
  """Compile, first step and steady-state steps of one batch size."""
  config = experiment_config(args, batch_size)
  mesh = partitioning.make_mesh(config.mesh, jax.devices()[:1])
  steps = train.make_steps(models.spec_of(config), train.make_optimizer(config.train),
                           config.seed, mesh, partitioning.rules_of(config.mesh))
  tokens = np.random.default_rng(0).integers(4, args.vocab_size, (batch_size, args.seq_len + 1))
  batch = steps.global_batch({"inputs": tokens[:, :-1].astype(np.int32),
                              "targets": tokens[:, 1:].astype(np.int32),
                              "weights": np.ones((batch_size, args.seq_len), np.float32)})
  state = steps.state
  compile_s = steps.compile_train(state, batch)
  memory = steps.train_fn.memory_analysis()
  cudnn_attention = "__cudnn$fmha" in steps.train_fn.as_text()
  start = time.perf_counter()
  state, out = steps.train(state, batch)
  jax.block_until_ready(out)
  first_s = time.perf_counter() - start
  for _ in range(args.warmup):
    state, out = steps.train(state, batch)
  jax.block_until_ready(out)
  state, out, times = harness.timed_steps(steps.train, state, batch, args.steps)
  loss = float(out["loss_sum"] / out["tokens"])
  if not np.isfinite(loss):
    raise RuntimeError(f"the loss is {loss} after {1 + args.warmup + args.steps} steps")
  stats = jax.devices()[0].memory_stats() or {}
  return dict(config=config, batch_size=batch_size, compile_s=compile_s, first_s=first_s,
              times=times, loss=loss, memory=memory, peak_bytes=stats.get("peak_bytes_in_use"),
              cudnn_attention=cudnn_attention)


def _bytes(n: int | None) -> str:
  if n is None:
    return "n/a"
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def report(args: types.SimpleNamespace, r: dict, tried: list[int]) -> str:
  spec = models.spec_of(r["config"])
  summary = models.summarize(spec, seq_len=args.seq_len)
  flops_per_token = summary["flops_per_token"]
  peak, peak_source = metrics.peak_flops()
  step_s = statistics.median(r["times"])
  tokens_per_s = r["batch_size"] * args.seq_len / step_s
  mfu = flops_per_token * tokens_per_s / peak
  device = jax.devices()[0]
  mem = r["memory"]
  lines = []
  if device.platform != "gpu":
    lines += [f"**No GPU was available to this run** (backend {device.platform}): the GPU "
              "numbers are missing. The script is ready to run on a GPU machine: "
              "`python -m bench.gpu_mfu --out=bench/gpu_mfu.md`.", ""]
  if args.dry_run:
    lines += ["Dry run (`--dry_run`): a shrunken model through exactly the code path of the "
              "full run; its times and MFU say nothing about GPU performance.", ""]
  lines += [
      "# bf16 MFU of a weight-tied decoder LM on one device",
      "",
      f"Command: `{harness.command()}`",
      "",
      f"jax {jax.__version__}, device {device.device_kind} ({device.platform}), peak "
      f"{peak / 1e12:.1f} TFLOP/s ({peak_source}).",
      "",
      f"Model: decoder_lm, one unique layer applied N={spec.num_layers} times, "
      f"d_model={spec.d_model}, heads={spec.num_heads} x {spec.head_dim}, d_ff={spec.d_ff}, "
      f"GELU, RMSNorm, no biases, vocab={spec.vocab_size} (tied), seq={args.seq_len}; "
      f"{summary['applied_params'] / 1e6:,.1f}M applied / {summary['unique_params'] / 1e6:,.1f}M "
      f"unique parameters. dtype={spec.dtype} (float32 master weights, gradients, loss), "
      f"attention_impl={spec.attention_impl}, remat_policy={spec.remat_policy}, AdamW "
      "(xlps.train.make_steps on a one-device mesh).",
      "",
      "| quantity | value |",
      "|---|---|",
      f"| batch | {r['batch_size']} x {args.seq_len} = {r['batch_size'] * args.seq_len:,} "
      f"tokens{'' if len(tried) == 1 else f' (out of memory at {tried[:-1]})'} |",
      f"| attention kernel in the compiled step | "
      f"{'cuDNN flash attention (__cudnn$fmha calls)' if r['cudnn_attention'] else 'XLA'} |",
      f"| compile (lower + XLA compile) | {r['compile_s']:.1f} s |",
      f"| first step after compile | {r['first_s']:.3f} s |",
      f"| steady-state step (median of {len(r['times'])}, after {args.warmup} warm-up) | "
      f"{step_s:.4f} s (min {min(r['times']):.4f}, max {max(r['times']):.4f}) |",
      f"| tokens/s | {tokens_per_s:,.0f} |",
      f"| model FLOPs per token (training) | {flops_per_token / 1e9:.4g} GFLOP |",
      f"| MFU | {100 * mfu:.1f}% |",
      f"| memory_analysis: arguments / outputs / temp | {_bytes(mem.argument_size_in_bytes)} / "
      f"{_bytes(mem.output_size_in_bytes)} / {_bytes(mem.temp_size_in_bytes)} |",
      f"| device peak bytes in use | {_bytes(r['peak_bytes'])} |",
      f"| loss after {1 + args.warmup + len(r['times'])} steps (random tokens) | "
      f"{r['loss']:.4f} |",
      "",
  ]
  return "\n".join(lines)


def main(argv):
  del argv
  args = settings()
  batch_size, tried = args.batch_size, []
  while True:
    tried.append(batch_size)
    try:
      result = measure(args, batch_size)
      break
    except Exception as e:  # noqa: BLE001 (XLA reports OOM as several error types)
      if not out_of_memory(e) or batch_size == 1:
        raise
      print(f"batch {batch_size} does not fit; trying {batch_size // 2}", file=sys.stderr)
      batch_size //= 2
  harness.report(report(args, result, tried), args.out)


if __name__ == "__main__":
  # JAX preallocates 75% of GPU memory by default; the step may need more.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  harness.run(main)
