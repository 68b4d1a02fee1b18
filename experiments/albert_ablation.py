"""ALBERT's cross-layer sharing ablation (Lan et al. 2019, Table 4) at small scale.

Masked LM on the stdlib byte corpus with the ALBERT architecture (post-LN, embedding
LayerNorm, tied MLM head) at H = 128, 4 layers, 2 heads, d_ff 512: all-shared /
shared-attention / shared-FFN / not-shared, each with E = H = 128 and with a factorized
embedding E = 32 < H; two seeds each. In the partial modes only the named component is
shared; the LayerNorms stay per layer, as in ALBERT's code. Results:
experiments/results/albert_ablation/README.md.

    python -m launch.sweep --experiment=experiments/albert_ablation.py \
        --workdir=/tmp/albert_ablation --parallel=2
"""

from xlps import sweep

BASE = "configs/albert.py:base,runlocal"   # H 128, 4 layers, 2 heads, d_ff 512, vocab 300
COMMON = {"train.num_steps": 400, "train.decay_steps": 400, "train.batch_size": 16,
          "data.seq_len": 64, "model.max_len": 64, "train.learning_rate": 1e-3,
          "train.warmup_steps": 40, "train.log_every_steps": 25, "train.eval_every_steps": 200,
          "train.checkpoint_every_steps": 400, "data.eval_batches": 16}

LAYERS = 4
SHARING = {  # ALBERT's four rows: which components one parameter set serves
    "all-shared": {"model.sharing.num_unique": 1},
    "shared-attention": {"model.sharing.num_unique": LAYERS,
                         "model.sharing.attention.num_unique": 1},
    "shared-FFN": {"model.sharing.num_unique": LAYERS, "model.sharing.mlp.num_unique": 1},
    "not-shared": {"model.sharing.num_unique": LAYERS},
}


def get_grid() -> list[dict]:
  embed = [{"model.embed_dim": 0}, {"model.embed_dim": 32}]   # E = H, E < H
  return sweep.product(embed, SHARING.values(), sweep.seeds(0, 1))
