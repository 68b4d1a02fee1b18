"""ALBERT (Lan et al. 2019) and BERT-base as masked-LM encoders; variants by argument.

Trains the masked-LM family on the standard-library corpus (bytes, BERT-style 80/10/10
masking); ``runlocal`` shrinks the model and run for a CPU check. Variants: ``base`` (L12 H768), ``large`` (L24 H1024), ``xlarge`` (L24 H2048),
``xxlarge`` (L12 H4096): vocab 30000, E 128, all layers share one parameter set
(attention, FFN and LayerNorms), tied MLM output. ``bert_base``: BERT's L12 H768, vocab
30522, E = H, no sharing. Parameter counts are those of ``AlbertForMaskedLM`` /
``BertForMaskedLM`` (no pooler); the paper's figures include the pooler
(``--config.model.pooler=True``).

    python -m launch.summary --config=configs/albert.py:base
    python -m launch.train --config=configs/albert.py:base,runlocal --workdir=/tmp/albert
    python -m launch.summary --config=configs/albert.py:xxlarge --config.model.num_layers=48
    python -m launch.summary --config=configs/albert.py:base \
        --config.model.sharing.mlp.num_unique=12 --config.model.sharing.mlp.order=sequence
"""

import ml_collections

from xlps import config as config_lib
from xlps import train as train_lib

# name: (layers, hidden)
ALBERT_SIZES = {"base": (12, 768), "large": (24, 1024), "xlarge": (24, 2048),
                "xxlarge": (12, 4096)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, variant="base", runlocal=False)
  config = train_lib.base_config()
  m = config.model
  m.family = "encoder_mlm"
  m.norm_position = "post"              # BERT/ALBERT: LayerNorm after each residual add
  m.embed_norm = True                   # LayerNorm over the summed embeddings
  m.norm = "layernorm"
  m.norm_eps = 1e-12
  m.max_len = 512
  m.type_vocab_size = 2
  m.tie_embeddings = True               # MLM decoder = word embeddings (+ a bias)
  if arg.variant == "bert_base":
    layers, hidden = 12, 768
    m.vocab_size = 30522
    m.embed_dim = 0                     # E = H
    m.activation = "gelu"               # BERT: exact erf GELU
    m.dropout_rate = 0.1
    m.attention_dropout_rate = 0.1
    m.sharing = config_lib.sharing_config(num_unique=layers, order="sequence")  # no sharing
  elif arg.variant in ALBERT_SIZES:
    layers, hidden = ALBERT_SIZES[arg.variant]
    m.vocab_size = 30000
    m.embed_dim = 128                   # factorized embedding E < H
    m.activation = "gelu_tanh"          # ALBERT's gelu_new
    m.dropout_rate = 0.0                # ALBERT v2 trains without dropout
    m.attention_dropout_rate = 0.0
    m.sharing = config_lib.sharing_config(num_unique=1, order="sequence")  # all shared
  else:
    raise ValueError(f"configs/albert.py variant {arg.variant!r} is unknown; valid: "
                     f"{', '.join([*ALBERT_SIZES, 'bert_base'])}")
  m.num_layers = layers
  m.d_model = hidden
  m.num_heads = hidden // 64
  m.d_ff = 4 * hidden

  config.data.name = "stdlib"
  config.data.seq_len = 128
  config.data.mlm_probability = 0.15

  t = config.train
  t.num_steps = 10000
  t.batch_size = 128
  t.learning_rate = 1e-3 if arg.variant != "bert_base" else 1e-4
  t.warmup_steps = 1000
  t.log_every_steps = 100
  t.eval_every_steps = 1000
  t.checkpoint_every_steps = 1000
  if arg.runlocal:
    m.vocab_size = 300                  # bytes + specials, rounded up
    m.d_model, m.num_heads, m.d_ff = 128, 2, 512
    m.embed_dim = 64 if arg.variant != "bert_base" else 0
    m.num_layers = 4
    m.sharing.num_unique = 1 if arg.variant != "bert_base" else 4
    t.num_steps, t.batch_size, t.warmup_steps, t.log_every_steps = 200, 16, 20, 20
    t.eval_every_steps = t.checkpoint_every_steps = 100
  return config
