"""Depth for free? (looped transformers, Saunshi et al. 2025): language-modelling half.

A 1-layer block looped L times (fully tied, N = L, M = 1) for L in {1, 2, 4, 8, 16} at
constant unique parameters, against L distinct layers (N = M = L, the unshared baselines)
on the stdlib byte-level LM: validation loss against applied training FLOPs per token.
d_model 64, 2 heads, d_ff 128 (SwiGLU), pre-LN RMSNorm; 300 steps of 16 x 64 bytes; two
seeds. The iterative-task half is experiments/depth_for_free_addition.py. Results:
experiments/results/depth_for_free/README.md.

    python -m launch.sweep --experiment=experiments/depth_for_free.py \
        --workdir=/tmp/depth_for_free --parallel=2
"""

from xlps import sweep

BASE = "configs/default.py:runlocal"   # d_model 64, 2 heads, d_ff 128, SwiGLU, RMSNorm, pre-LN
COMMON = {"train.num_steps": 300, "train.decay_steps": 300, "train.batch_size": 16,
          "data.seq_len": 64, "model.max_len": 64, "train.learning_rate": 3e-3,
          "train.warmup_steps": 30, "train.log_every_steps": 25, "train.eval_every_steps": 300,
          "train.checkpoint_every_steps": 300, "data.eval_batches": 16,
          "model.sharing.order": "sequence"}


def get_grid() -> list[dict]:
  looped = [{"model.num_layers": n, "model.sharing.num_unique": 1} for n in (1, 2, 4, 8, 16)]
  distinct = [{"model.num_layers": n, "model.sharing.num_unique": n} for n in (2, 4, 8, 16)]
  return sweep.product(looped + distinct, sweep.seeds(0, 1))
