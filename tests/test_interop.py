"""HF ALBERT / BERT interop: outputs equal transformers', round trips are exact, a converted
checkpoint fine-tunes, and the configs/albert.py parameter counts equal HF's."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is built locally
_REASON = "HF interop tests need torch and transformers: pip install -e '.[interop]'"
torch = pytest.importorskip("torch", reason=_REASON)
transformers = pytest.importorskip("transformers", reason=_REASON)

from configs import albert  # noqa: E402
from xlps import config as config_lib  # noqa: E402
from xlps import interop, models, train  # noqa: E402
from xlps.interop import huggingface  # noqa: E402

from helpers import HF_ALBERT, HF_SMALL, logged_losses, small_albert  # noqa: E402

TOLERANCE = 1e-5  # max |xlps - HF| of outputs, float32 (measured <= 4e-6 with random weights)


def randomized(hf_model):
  """Every parameter set to noise: a fresh HF model has zero biases and unit LayerNorms, under
  which a converter that swaps biases or norms would still compute HF's outputs."""
  with torch.no_grad():
    for p in hf_model.parameters():  # tied weights are listed once, so they stay tied
      p.normal_(0.0, 0.2)
    for module in hf_model.modules():
      if isinstance(module, torch.nn.LayerNorm):
        module.weight.add_(1.0)
  return hf_model.eval()


def albert_model(cls=None, **overrides):
  torch.manual_seed(0)
  config = transformers.AlbertConfig(**{**HF_ALBERT, **overrides})
  return randomized((cls or transformers.AlbertForMaskedLM)(config))


def bert_model(cls=None, **overrides):
  torch.manual_seed(0)
  config = transformers.BertConfig(**{**HF_SMALL, "num_hidden_layers": 3, **overrides})
  return randomized((cls or transformers.BertForMaskedLM)(config))


CASES = {
    "albert_groups1": lambda: albert_model(),
    "albert_groups2": lambda: albert_model(num_hidden_groups=2),
    "albert_groups2_inner2_table": lambda: albert_model(num_hidden_layers=5, num_hidden_groups=2,
                                                        inner_group_num=2),
    "albert_model_pooler": lambda: albert_model(transformers.AlbertModel),
    "bert": lambda: bert_model(),
    "bert_model_pooler_relu": lambda: bert_model(transformers.BertModel, hidden_act="relu"),
}


def batch(vocab_size=300, length=12):
  """Two rows, the second padded from position 7, segment 1 from position 6."""
  rng = np.random.RandomState(0)
  mask = np.ones((2, length), np.int64)
  mask[1, 7:] = 0
  types = np.zeros((2, length), np.int64)
  types[:, 6:] = 1
  return {"input_ids": rng.randint(0, vocab_size, (2, length)), "attention_mask": mask,
          "token_type_ids": types}


def max_differences(hf_model, config, params) -> dict[str, float]:
  """Max |xlps - HF| of the last hidden states and the MLM logits (or the pooled output)."""
  b = batch(config.model.vocab_size)
  with torch.no_grad():
    out = hf_model(**{k: torch.tensor(v) for k, v in b.items()}, output_hidden_states=True)
  logits, state = models.build(config).apply({"params": params}, huggingface.from_hf_batch(b),
                                             deterministic=True, mutable=["intermediates"])
  ours = state["intermediates"]
  diffs = {"hidden": np.abs(ours["hidden_states"][0] - out.hidden_states[-1].numpy()).max()}
  if hasattr(out, "logits"):
    diffs["logits"] = np.abs(logits - out.logits.numpy()).max()
  else:
    diffs["pooled"] = np.abs(ours["pooled"][0] - out.pooler_output.numpy()).max()
  return {k: float(v) for k, v in diffs.items()}


def assert_outputs_close(hf_model, config, params, label: str) -> None:
  diffs = max_differences(hf_model, config, params)
  print(f"{label}: max abs difference {diffs}")
  assert max(diffs.values()) <= TOLERANCE, diffs


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.mark.parametrize("case", CASES)
def test_outputs_equal_transformers(case):
  hf_model = CASES[case]()
  config, params = huggingface.load_hf(hf_model)
  assert_outputs_close(hf_model, config, params, case)
  assert config.model.pooler == ("pooler" in case)
  if case == "albert_groups2_inner2_table":  # group int(i / 2.5), two layers per group
    assert models.summarize(config)["slots"]["mlp"] == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3]


@pytest.mark.parametrize("case", CASES)
def test_hf_round_trip_is_exact(case, tmp_path):
  hf_model = CASES[case]()
  config, params = huggingface.load_hf(hf_model)
  huggingface.save_hf(config, params, tmp_path)
  reloaded = type(hf_model).from_pretrained(tmp_path)  # HF -> xlps -> HF
  original, back = hf_model.state_dict(), reloaded.state_dict()
  assert original.keys() == back.keys()
  assert all(torch.equal(original[k], back[k]) for k in original)
  config2, params2 = huggingface.load_hf(tmp_path)  # xlps -> HF -> xlps, from the directory
  assert_trees_equal(params, params2)
  assert models.spec_of(config2) == models.spec_of(config)


def slots(config) -> dict[str, tuple[int, ...]]:
  return {c: p.slots for c, p in models.spec_of(config).stack_plans("encoder").items()}


@pytest.mark.parametrize("sharing,layout", [
    ({"num_unique": 2, "order": "sequence"}, (4, 2, 1)),
    ({"num_unique": 2, "order": "cycle"}, (2, 1, 2)),  # one group of two layers, twice
    ({"num_unique": 3, "order": "table", "table": "0 0 1 2"}, (4, 3, 1)),  # int(i / (4/3))
], ids=["sequence", "cycle", "table"])
def test_xlps_round_trip_is_exact(sharing, layout, tmp_path):
  config = small_albert(pooler=True, sharing=sharing)
  rng = np.random.RandomState(1)  # any values: no init to compile
  params = {}
  for path, shape in models.param_shapes(config).items():
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = rng.normal(0.0, 0.5, shape).astype(np.float32)
  huggingface.save_hf(config, params, tmp_path)
  hf = json.loads((tmp_path / "config.json").read_text())
  assert (hf["num_hidden_layers"], hf["num_hidden_groups"], hf["inner_group_num"]) == layout
  config2, params2 = huggingface.load_hf(tmp_path)
  assert_trees_equal(params, params2)
  assert slots(config2) == slots(config)
  hf_model = transformers.AlbertForMaskedLM.from_pretrained(tmp_path).eval()
  assert_outputs_close(hf_model, config, params, f"xlps {config.model.sharing.order}")


@pytest.mark.parametrize("model,message", [
    ({"norm_position": "pre"}, "norm_position='pre'"),
    ({"norm": "rmsnorm"}, "norm='rmsnorm'"),
    ({"activation": "swiglu"}, "activation='swiglu'"),
    ({"num_kv_heads": 2}, "num_kv_heads=2 != num_heads=4"),
    ({"sharing": {"mlp": {"num_unique": 4, "order": "sequence"}}}, "plans differ"),
    ({"sharing": {"num_unique": 2, "order": "cycle_rev"}}, "not an ALBERT layout"),
    ({"embed_dim": 0}, "embed_dim == d_model"),
])
def test_save_rejects_what_hf_cannot_express(model, message, tmp_path):
  config = small_albert(**model)
  with pytest.raises(ValueError, match=message):
    huggingface.save_hf(config, {}, tmp_path)


@pytest.mark.parametrize("make,message", [
    (lambda: albert_model(embedding_size=32), "embedding_size=32 >= hidden_size=32"),
    (lambda: albert_model(hidden_act="silu"), "hidden_act='silu'"),
])
def test_load_rejects_what_xlps_cannot_express(make, message):
  with pytest.raises(ValueError, match=message):
    huggingface.load_hf(make())


@pytest.mark.slow
def test_converted_checkpoint_fine_tunes(tmp_path, data_dir):
  albert_model(num_hidden_groups=2).save_pretrained(tmp_path / "hf")
  workdir = tmp_path / "wd"
  config, converted = huggingface.load_hf(tmp_path / "hf")  # what launch.convert --hf does
  assert (config.data.tokenizer, config.data.tokenizer_path) == ("file", "")  # none in hf/
  # Random weights: byte ids (vocab 260 <= 300) serve as well as any; a real model trains on
  # its own tokenizer (tests/test_tokenizer_files.py).
  config.data.update(name="stdlib", data_dir=str(data_dir), seq_len=32, eval_batches=2,
                     tokenizer="byte")
  config.train.update(num_steps=4, batch_size=8, warmup_steps=2, log_every_steps=1,
                      eval_every_steps=4, checkpoint_every_steps=1, keep_checkpoints=4)
  interop.write_checkpoint(config, converted, workdir)
  result = train.train_and_evaluate(config, workdir)
  losses = logged_losses(workdir)
  assert result["step"] == 4 and sorted(losses) == [1, 2, 3, 4]
  assert np.isfinite(list(losses.values())).all() and np.isfinite(result["last_eval"]["eval_loss"])
  # Warmup starts at learning rate 0: the first update leaves the converted parameters.
  _, params, _ = interop.read_checkpoint(workdir, step=1)
  assert_trees_equal(jax.tree.map(np.asarray, params), converted)

  # Back to HF from the trained checkpoint: the HF model computes the xlps model's outputs.
  config2, params, step = interop.read_checkpoint(workdir)
  params = jax.tree.map(np.asarray, params)
  assert step == 4 and not np.array_equal(params["embedder"]["embedding"],
                                          converted["embedder"]["embedding"])
  huggingface.save_hf(config2, params, tmp_path / "hf_out")
  hf_model = transformers.AlbertForMaskedLM.from_pretrained(tmp_path / "hf_out").eval()
  assert_outputs_close(hf_model, config2, params, "fine-tuned, back to HF")


def test_checkpoint_from_before_new_model_keys_reads_with_their_defaults(tmp_path, monkeypatch):
  """A checkpoint saved before keys existed (its metadata lacks them) converts back to HF."""
  config = small_albert()
  config.data.seq_len = 64
  params = jax.tree.map(np.asarray, nn.unbox(models.init_params(config)))
  new_metadata = train.checkpoint_metadata

  def old_metadata(*args):  # what a revision without these model keys wrote
    metadata = new_metadata(*args)
    for key in ("attention_impl", "remat_group_size", "scale_embeddings"):
      del metadata["config"]["model"][key]
    return metadata

  monkeypatch.setattr(train, "checkpoint_metadata", old_metadata)
  interop.write_checkpoint(config, params, tmp_path / "old")
  config2, params2, _ = interop.read_checkpoint(tmp_path / "old")
  assert config2.model.attention_impl == "auto" and config2.model.remat_group_size == 0
  huggingface.save_hf(config2, jax.tree.map(np.asarray, params2), tmp_path / "hf_out")
  hf_model = transformers.AlbertForMaskedLM.from_pretrained(tmp_path / "hf_out").eval()
  assert_outputs_close(hf_model, config2, params, "old checkpoint, to HF")


HF_SIZES = {"base": (12, 768), "large": (24, 1024), "xlarge": (24, 2048), "xxlarge": (12, 4096),
            "bert_base": (12, 768)}


@pytest.mark.parametrize("variant", HF_SIZES)
def test_unique_params_equal_transformers(variant):
  layers, hidden = HF_SIZES[variant]
  sizes = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
               intermediate_size=4 * hidden)
  with torch.device("meta"):  # shapes only: no memory for xxlarge's 206M parameters
    if variant == "bert_base":
      hf_model = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=30522, **sizes))
    else:
      hf_model = transformers.AlbertForMaskedLM(
          transformers.AlbertConfig(vocab_size=30000, embedding_size=128, **sizes))
  ours = models.summarize(albert.get_config(variant))["unique_params"]
  theirs = sum(p.numel() for p in hf_model.parameters())  # tied weights counted once
  print(f"{variant}: xlps {ours:,} HF {theirs:,}")
  assert ours == theirs


@pytest.mark.slow
def test_weight_decay_step_equals_torch_adamw():
  """One xlps AdamW step (``train.make_optimizer``) equals ``torch.optim.AdamW`` with HF's
  parameter groups: no decay on biases and LayerNorms, decay on everything else.

  lr * weight_decay * |p| (1e-3 * |p|) is far above the tolerance, so decaying a bias or a
  norm (or sparing a matrix) fails. lr is small because Adam's first step is lr * sign(g)
  and the attention key bias' gradient is float noise (softmax ignores it): lr bounds what
  sign flips can cost.
  """
  hf_model = albert_model(num_hidden_groups=2, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)  # stacked slots: biases (M, d)
  config, params = huggingface.load_hf(hf_model)
  t = config.train
  t.update(learning_rate=1e-6, weight_decay=1e3, warmup_steps=0, grad_clip_norm=0.0)
  b = batch()
  rng = np.random.RandomState(1)
  weights = (rng.rand(2, 12) < 0.5) & (b["attention_mask"] > 0)
  labels = rng.randint(0, HF_SMALL["vocab_size"], (2, 12))

  optimizer = train.make_optimizer(t)
  state = train.TrainState(step=np.int32(0), params=params, opt_state=optimizer.init(params),
                           rng=jax.random.PRNGKey(0))
  state, _ = train.train_step(
      state, huggingface.from_hf_batch(b) | {"targets": labels, "weights": weights},
      model=models.build(config), optimizer=optimizer)

  norms = {id(p) for m in hf_model.modules() if isinstance(m, torch.nn.LayerNorm)
           for p in m.parameters()}  # by type: ALBERT's full_layer_layer_norm has no "LayerNorm"
  named = list(hf_model.named_parameters())
  groups = [{"params": [p for n, p in named if ("bias" in n or id(p) in norms) == spared],
             "weight_decay": 0.0 if spared else t.weight_decay} for spared in (True, False)]
  adamw = torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.b1, t.b2), eps=1e-8)
  hf_labels = torch.tensor(np.where(weights, labels, -100))  # mean over the labelled tokens
  hf_model(**{k: torch.tensor(v) for k, v in b.items()}, labels=hf_labels).loss.backward()
  adamw.step()
  _, theirs = huggingface.load_hf(hf_model)

  diffs = jax.tree.map(lambda x, y: float(np.abs(x - y).max()), state.params, theirs)
  print(f"AdamW step: max abs differences {diffs}")
  assert max(jax.tree.leaves(diffs)) <= 1e-5, diffs


def test_converted_config_is_valid_for_training():
  # HF max_position_embeddings=64 < configs/albert.py's seq_len 128: clamped, not refused.
  config, _ = huggingface.load_hf(albert_model())
  assert (config.model.max_len, config.data.seq_len) == (64, 64)
  config_lib.validate(config)
