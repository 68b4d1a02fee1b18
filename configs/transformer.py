"""Encoder-decoder Transformer with Takase & Kiyono (2021) sharing orders and tying.

Variants (``configs/transformer.py:VARIANT``):
``vanilla``     6+6 layers, no sharing (the 61M baseline shape)
``sequence`` / ``cycle`` / ``cycle_rev``  N = 12 applied layers per side over M = 6 sets
``universal``   N = 12 applied layers, one set per side (Universal Transformer, no ACT)
``tied``        ``vanilla`` with the decoder reusing the encoder's attention and FFN
Add ``runlocal`` for a CPU-sized model (``configs/transformer.py:cycle,runlocal``).
Trains on the algorithmic ``reverse`` task by default (no translation corpus ships with
the machine; point ``config.data`` at a prepared TFDS dataset on a pod).

    python -m launch.train --config=configs/transformer.py:cycle_rev,runlocal --workdir=/tmp/t

    python -m launch.summary --config=configs/transformer.py:cycle_rev
    python -m launch.summary --config=configs/transformer.py:vanilla \
        --config.model.tie_encoder_decoder=True
"""

import ml_collections

from xlps import config as config_lib

VARIANTS = ("vanilla", "sequence", "cycle", "cycle_rev", "universal", "tied")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, variant="vanilla", runlocal=False)
  if arg.variant not in VARIANTS:
    raise ValueError(f"configs/transformer.py variant {arg.variant!r} is unknown; valid: "
                     f"{', '.join(VARIANTS)}")
  config = config_lib.base_config()
  m = config.model
  m.family = "encoder_decoder"
  m.vocab_size = 32000                 # WMT En-De shared BPE vocabulary size
  m.d_model = 512
  m.num_heads = 8
  m.d_ff = 2048
  m.activation = "relu"
  m.norm = "layernorm"
  m.norm_position = "pre"
  m.position_embedding = "sinusoidal"
  m.scale_embeddings = True            # x sqrt(d_model), as Vaswani et al.: tokens vs positions
  m.max_len = 256
  m.dropout_rate = 0.1
  m.attention_dropout_rate = 0.1
  if arg.variant in ("vanilla", "tied"):
    m.num_layers = 6
    m.sharing = config_lib.sharing_config(num_unique=6, order="sequence")
    m.tie_encoder_decoder = arg.variant == "tied"
  elif arg.variant == "universal":
    m.num_layers = 12
    m.sharing = config_lib.sharing_config(num_unique=1)
  else:
    m.num_layers = 12
    m.sharing = config_lib.sharing_config(num_unique=6, order=arg.variant)

  config.data.name = "algorithmic"
  config.data.task = "reverse"
  config.data.seq_len = 96

  t = config.train
  t.num_steps = 5000
  t.batch_size = 64
  t.learning_rate = 7e-4
  t.warmup_steps = 400
  if arg.runlocal:
    m.vocab_size, m.d_model, m.num_heads, m.d_ff, m.max_len = 260, 64, 2, 128, 96
    t.num_steps, t.batch_size, t.warmup_steps = 100, 16, 10
    t.log_every_steps, t.eval_every_steps, t.checkpoint_every_steps = 10, 50, 50
  return config
