"""ALBERT (Lan et al. 2019) and BERT-base presets: model shape and masked-LM pre-training.

The one place these numbers live: ``configs/albert.py`` builds its experiments from them and
``xlps.interop.huggingface`` starts a converted model's config from them, so the installed
library needs nothing from the repository's ``configs/``. Plain data and ``apply``; as light
to import as ``xlps.config`` (no JAX).

ALBERT sizes: vocab 30000, E 128, one parameter set shared by all layers (attention, FFN
and LayerNorms), gelu_new, no dropout (v2). ``bert_base``: vocab 30522, E = H, no sharing,
erf GELU, dropout 0.1. Both: post-LN, LayerNorm over the embeddings, two segments, MLM
decoder tied to the word embeddings (plus a bias), no pooler.
"""

from __future__ import annotations

import ml_collections

from xlps import config as config_lib

# name: (layers, hidden); heads = hidden / 64, FFN = 4 * hidden.
ALBERT_SIZES = {"base": (12, 768), "large": (24, 1024), "xlarge": (24, 2048),
                "xxlarge": (12, 4096)}
BERT_SIZES = {"bert_base": (12, 768)}
NAMES = (*ALBERT_SIZES, *BERT_SIZES)

_ENCODER = dict(
    family="encoder_mlm",
    norm_position="post",      # LayerNorm after each residual add
    embed_norm=True,           # LayerNorm over the summed embeddings
    norm="layernorm",
    norm_eps=1e-12,
    max_len=512,
    type_vocab_size=2,
    tie_embeddings=True,       # MLM decoder = word embeddings (+ a bias)
)
_ALBERT = dict(
    vocab_size=30000,
    embed_dim=128,             # factorized embedding E < H
    activation="gelu_tanh",    # ALBERT's gelu_new
    dropout_rate=0.0,          # ALBERT v2 trains without dropout
    attention_dropout_rate=0.0,
)
_BERT = dict(
    vocab_size=30522,
    embed_dim=0,               # E = H
    activation="gelu",         # BERT: exact erf GELU
    dropout_rate=0.1,
    attention_dropout_rate=0.1,
)
# Pre-training: stdlib byte corpus, BERT-style 80/10/10 masking of 15% of the tokens.
DATA = dict(name="stdlib", seq_len=128, mlm_probability=0.15)
TRAIN = dict(num_steps=10000, batch_size=128, warmup_steps=1000, log_every_steps=100,
             eval_every_steps=1000, checkpoint_every_steps=1000)
LEARNING_RATES = {"albert": 1e-3, "bert": 1e-4}


def apply(config: ml_collections.ConfigDict, name: str) -> None:
  """Sets preset ``name``'s model, data and train keys on a full experiment config.

  ``config`` is ``xlps.config.base_config()`` or one derived from it; keys the preset does
  not name keep their values. ConfigError (a ValueError) for an unknown ``name``.
  """
  if name in ALBERT_SIZES:
    (layers, hidden), arch_keys = ALBERT_SIZES[name], _ALBERT
    sharing = config_lib.sharing_config(num_unique=1, order="sequence")  # all shared
    learning_rate = LEARNING_RATES["albert"]
  elif name in BERT_SIZES:
    (layers, hidden), arch_keys = BERT_SIZES[name], _BERT
    sharing = config_lib.sharing_config(num_unique=layers, order="sequence")  # no sharing
    learning_rate = LEARNING_RATES["bert"]
  else:
    raise config_lib.ConfigError(f"ALBERT / BERT preset {name!r} is unknown; valid: "
                                 f"{', '.join(NAMES)}")
  config.model.update(_ENCODER, **arch_keys, num_layers=layers, d_model=hidden,
                      num_heads=hidden // 64, d_ff=4 * hidden)
  config.model.sharing = sharing  # replaced: update() would merge into the old plan
  config.data.update(DATA)
  config.train.update(TRAIN, learning_rate=learning_rate)
