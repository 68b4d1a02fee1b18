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
from xlps import presets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, variant="base", runlocal=False)
  config = config_lib.base_config()
  presets.apply(config, arg.variant)  # model shape, data and training of the preset
  m, t = config.model, config.train
  if arg.runlocal:
    m.vocab_size = 300                  # bytes + specials, rounded up
    m.d_model, m.num_heads, m.d_ff = 128, 2, 512
    m.embed_dim = 64 if arg.variant != "bert_base" else 0
    m.num_layers = 4
    m.sharing.num_unique = 1 if arg.variant != "bert_base" else 4
    t.num_steps, t.batch_size, t.warmup_steps, t.log_every_steps = 200, 16, 20, 20
    t.eval_every_steps = t.checkpoint_every_steps = 100
  return config
