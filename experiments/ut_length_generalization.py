"""Universal Transformer vs vanilla Transformer on algorithmic length generalization, and
encoder-decoder tying on reverse.

Copy, reverse and addition (Dehghani et al. 2018, section 3.4): train on lengths 1..20,
test on 1..20 (``test``) and on 21..40 (``test_long``). All models are 4+4-layer
encoder-decoders with d_model 64, 2 heads, d_ff 256, sinusoidal positions (token
embeddings scaled by sqrt(d_model)), no dropout, 2000 steps of 32 examples at lr 2e-3.
The Universal Transformer ties each side's 4 layers into one (M = 1, no ACT); the
vanilla one has 4 unique layers per side (M = 4). On reverse, a third model is the
vanilla one with the decoder reusing the encoder's self-attention and FFN parameters
(``tie_encoder_decoder``, the seed article's mode 2; its cross-attention and norms stay
its own). Exact-sequence accuracy is teacher-forced: a sequence counts when the argmax at
every target position is right. Two seeds each. Results:
experiments/results/ut_length_generalization/README.md and
experiments/results/encoder_decoder_tying/README.md.

    python -m launch.sweep --experiment=experiments/ut_length_generalization.py \
        --workdir=/tmp/ut_length_generalization --parallel=2
"""

from xlps import sweep

BASE = "configs/ut_algorithmic.py:copy"
COMMON = {"model.d_model": 64, "model.num_heads": 2, "model.d_ff": 256, "model.num_layers": 4,
          "model.dropout_rate": 0.0, "train.num_steps": 2000, "train.decay_steps": 2000,
          "train.batch_size": 32, "train.learning_rate": 2e-3, "train.warmup_steps": 100,
          "train.log_every_steps": 50, "train.eval_every_steps": 500,
          "train.checkpoint_every_steps": 2000, "data.num_eval_examples": 512,
          "data.eval_batches": 0}

UNIVERSAL = {"model.sharing.num_unique": 1}
VANILLA = {"model.sharing.num_unique": 4}
TIED = {"model.sharing.num_unique": 4, "model.tie_encoder_decoder": True}


def get_grid() -> list[dict]:
  tasks = [{"data.task": t} for t in ("copy", "reverse", "addition")]
  models = sweep.product(tasks, [UNIVERSAL, VANILLA]) + [{"data.task": "reverse", **TIED}]
  return sweep.product(models, sweep.seeds(0, 1))
