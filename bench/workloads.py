"""The two training-step workloads of ``bench.step_vs_torch`` and ``bench.profile_step``:
shapes, optimizer settings, the shared numpy batch, the xlps config and its compiled-ready
train step. ``xlps`` and ``configs`` are imported inside the functions, so a child process
of ``bench.step_vs_torch --before`` gets them from the other source tree."""

BATCH, SEQ = 8, 128
LR, WEIGHT_DECAY, CLIP = 1e-4, 0.01, 1.0
SHAPES = {
    "albert": dict(vocab=30000, embed=128, hidden=768, heads=12, ffn=3072, layers=12),
    "decoder": dict(vocab=32000, embed=768, hidden=768, heads=12, ffn=3072, layers=12),
}


def batch_arrays(workload: str, seed: int = 0) -> dict:
  """The numpy batch both implementations train on (same tokens, same scored positions)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  vocab = SHAPES[workload]["vocab"]
  tokens = rng.integers(5, vocab, (BATCH, SEQ), dtype=np.int32)
  if workload == "albert":
    scored = rng.random((BATCH, SEQ)) < 0.15
    inputs = np.where(scored, 4, tokens).astype(np.int32)  # 4 = [MASK]
    return dict(inputs=inputs, targets=tokens, weights=scored.astype(np.float32))
  targets = np.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
  weights = np.ones((BATCH, SEQ), np.float32)
  weights[:, -1] = 0.0  # as HF's internal shift: the last position has no next token
  return dict(inputs=tokens, targets=targets, weights=weights)


def xlps_config(workload: str):
  """The full xlps experiment config of ``workload`` (keys that every revision knows)."""
  from configs import albert
  from xlps import config as config_lib
  shape = SHAPES[workload]
  if workload == "albert":
    config = albert.get_config("base")
    config.model.activation = "gelu"
  else:
    config = config_lib.base_config()
    m = config.model
    m.family, m.vocab_size = "decoder_lm", shape["vocab"]
    m.d_model, m.num_heads = shape["hidden"], shape["heads"]
    m.d_ff, m.num_layers, m.max_len, m.activation = shape["ffn"], shape["layers"], 512, "gelu"
    m.norm_eps = 1e-5
    m.sharing.num_unique = 1
  config.model.dropout_rate = config.model.attention_dropout_rate = 0.0
  t = config.train
  t.learning_rate, t.weight_decay, t.grad_clip_norm = LR, WEIGHT_DECAY, CLIP
  t.warmup_steps, t.num_steps, t.batch_size = 0, 1000, BATCH
  config.data.seq_len = SEQ
  return config


def xlps_setup(workload: str, config):
  """(model spec, ``xlps.train.Steps``, global batch, mesh, rules) of ``config`` on a
  one-device mesh."""
  from xlps import config as config_lib
  from xlps import partitioning
  from xlps import train as train_lib
  spec = config_lib.validate(config)
  mesh = partitioning.make_mesh(config.mesh)
  rules = partitioning.rules_of(config.mesh)
  setup = train_lib.make_steps(spec, train_lib.make_optimizer(config.train), 0, mesh, rules)
  arrays = batch_arrays(workload)
  if workload == "albert":
    arrays["input_mask"] = (arrays["inputs"] != 0).astype("int32")
  return spec, setup, setup.global_batch(arrays), mesh, rules
