"""Sharing orders at equal parameters (Takase & Kiyono 2021) on the stdlib byte-level LM.

M = 3 unique layers: vanilla (N = M = 3), SEQUENCE / CYCLE / CYCLE-REV at N = 2M = 6 and
N = 3M = 9 applied layers, and the Universal Transformer (M = 1) at N = 6; two seeds each.
Results: experiments/results/sharing_orders/README.md.

    python -m launch.sweep --experiment=experiments/sharing_orders.py \
        --workdir=/tmp/sharing_orders --parallel=2
"""

from xlps import sweep

BASE = "configs/default.py:runlocal"   # d_model 64, 2 heads, d_ff 128, SwiGLU, RMSNorm, pre-LN
COMMON = {"train.num_steps": 300, "train.decay_steps": 300, "train.batch_size": 16,
          "data.seq_len": 128, "model.max_len": 128, "train.learning_rate": 3e-3,
          "train.warmup_steps": 30, "train.log_every_steps": 25, "train.eval_every_steps": 300,
          "train.checkpoint_every_steps": 300, "data.eval_batches": 8}


def get_grid() -> list[dict]:
  vanilla = [{"model.num_layers": 3, "model.sharing.num_unique": 3,
              "model.sharing.order": "sequence"}]
  shared = sweep.product([{"model.num_layers": n} for n in (6, 9)],
                         [{"model.sharing.num_unique": 3, "model.sharing.order": o}
                          for o in ("sequence", "cycle", "cycle_rev")])
  universal = [{"model.num_layers": 6, "model.sharing.num_unique": 1,
                "model.sharing.order": "cycle"}]
  return sweep.product(vanilla + shared + universal, sweep.seeds(0, 1))
