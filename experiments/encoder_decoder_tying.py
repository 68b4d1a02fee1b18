"""Encoder-decoder tying (the seed's mode 2) at equal applied depth on algorithmic reverse.

The tied model's decoder reuses the encoder's self-attention and FFN parameters in every
layer (its cross-attention and norms stay its own); the untied one has separate encoder
and decoder layers. Both are unshared across depth (M = N = 4 layers per side), d_model
64, 2 heads, d_ff 256, sinusoidal positions, dropout 0.1, 1500 steps of 32 examples of
lengths 1..20, tested on 1..20 and 21..40 (teacher-forced exact-sequence accuracy); three
seeds.
Results: experiments/results/encoder_decoder_tying/README.md.

    python -m launch.sweep --experiment=experiments/encoder_decoder_tying.py \
        --workdir=/tmp/encoder_decoder_tying --parallel=2
"""

from xlps import sweep

BASE = "configs/ut_algorithmic.py:reverse,unshared"
COMMON = {"model.d_model": 64, "model.num_heads": 2, "model.d_ff": 256, "model.num_layers": 4,
          "model.sharing.num_unique": 4,
          "train.num_steps": 1500, "train.decay_steps": 1500, "train.batch_size": 32,
          "train.learning_rate": 1e-3, "train.warmup_steps": 100, "train.log_every_steps": 50,
          "train.eval_every_steps": 500, "train.checkpoint_every_steps": 1500,
          "data.num_eval_examples": 512, "data.eval_batches": 0}


def get_grid() -> list[dict]:
  tying = [{"model.tie_encoder_decoder": False}, {"model.tie_encoder_decoder": True}]
  return sweep.product(tying, sweep.seeds(0, 1, 2))
