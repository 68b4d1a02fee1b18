"""Recursify: slot inits, the identity at M = N, full-rank SVD LoRA reproducing every layer,
an HF BERT directory against HF's own model with the reconstructed weights, and the CLI."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from xlps import config as config_lib
from xlps import interop, models, recursify, sharing

from helpers import HF_SMALL, ROOT, logged_losses, tiny

N = 6


def source(seed=0, num_layers=N, **overrides):
  """A full config with an unshared tiny decoder LM whose every leaf differs per layer."""
  config = config_lib.base_config()
  config.model = tiny("decoder_lm", num_layers, sharing={"num_unique": num_layers,
                                                          "order": "sequence"}, **overrides)
  params = nn.unbox(models.init_params(models.spec_of(config), seed))
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  noisy = [np.asarray(x) + rng.normal(0, 0.1, x.shape).astype(np.float32) for x in leaves]
  return config, jax.tree.unflatten(tree, noisy)


def logits(config, params, batch):
  return np.asarray(models.build(config).apply({"params": params}, batch))


def batch_of(config):
  return models.example_batch(models.spec_of(config), 2, 8, seed=3)


@pytest.mark.parametrize("init,order,expect", [
    ("average", "cycle", [[0, 3], [1, 4], [2, 5]]),
    ("stepwise", "cycle", [[0], [2], [4]]),
    ("lower", "cycle", [[0], [1], [2]]),
    ("average", "sequence", [[0, 1], [2, 3], [4, 5]]),
    ("stepwise", "sequence", [[0], [2], [4]]),
])
def test_source_layers_of_each_init(init, order, expect):
  assert recursify.source_layers(sharing.make_plan(N, 3, order), init) == expect


def test_middle_cycle_inits_keep_the_first_and_last_layers():
  plan = sharing.make_plan(8, 4, "middle_cycle")
  assert plan.slots == (0, 1, 2, 1, 2, 1, 2, 3)
  assert recursify.source_layers(plan, "stepwise") == [[0], [1], [4], [7]]
  assert recursify.source_layers(plan, "lower") == [[0], [1], [2], [7]]
  assert recursify.source_layers(plan, "average") == [[0], [1, 3, 5], [2, 4, 6], [7]]


def test_m_equals_n_sequence_without_lora_is_the_identity():
  config, params = source()
  batch = batch_of(config)
  expect = logits(config, params, batch)
  for init in recursify.INITS:
    new_config, new_params = recursify.recursify(config, params, N, "sequence", init)
    np.testing.assert_allclose(logits(new_config, new_params, batch), expect, atol=1e-6,
                               rtol=0, err_msg=init)


def test_average_init_is_the_mean_of_the_slots_layers():
  config, params = source()
  _, new = recursify.recursify(config, params, 2, "cycle", "average")
  old = params["decoder"]["layers"]["mlp"]["wi"]["kernel"]
  np.testing.assert_allclose(new["decoder"]["layers"]["mlp"]["wi"]["kernel"][1],
                             (old[1] + old[3] + old[5]) / 3, rtol=1e-6)
  np.testing.assert_array_equal(new["embedder"]["embedding"], params["embedder"]["embedding"])


def effective_kernels(config, params):
  """Applied layer -> its projections' effective (slot + A B) kernels, as 2-D matrices."""
  spec = models.spec_of(config)
  plans = spec.stacks[0].plans
  out = []
  for i in range(N):
    layer = {}
    for comp in ("attention", "mlp"):
      for name, node in params["decoder"]["layers"][comp].items():
        slot = plans[comp].slots[i] if plans[comp].num_unique > 1 else None
        kernel = np.asarray(node["kernel"] if slot is None else node["kernel"][slot], np.float64)
        d_out = int(np.prod(kernel.shape[-1 if comp == "mlp" or name == "out" else -2:]))
        kernel = kernel.reshape(-1, d_out)
        if "lora_a" in node:
          r = node["lora_a"].shape[-1]
          kernel = kernel + (np.asarray(node["lora_a"][i], np.float64).reshape(-1, r)
                             @ np.asarray(node["lora_b"][i], np.float64).reshape(r, -1))
        layer[f"{comp}/{name}"] = kernel
    out.append(layer)
  return out


@pytest.mark.parametrize("num_unique,order", [(3, "cycle"), (2, "cycle"), (4, "middle_cycle")])
def test_full_rank_svd_lora_reproduces_every_layer(num_unique, order):
  config, params = source()
  new_config, new_params = recursify.recursify(
      config, params, num_unique, order, "stepwise", lora_rank=16, lora_bias=True,
      unshared_norms=True)
  for got, want in zip(effective_kernels(new_config, new_params),
                       effective_kernels(config, params)):
    for name in want:
      np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=name)
  batch = batch_of(config)
  np.testing.assert_allclose(logits(new_config, new_params, batch),
                             logits(config, params, batch), atol=1e-5, rtol=0)


def test_truncated_svd_lora_is_the_best_rank_r_residual():
  config, params = source()
  new_config, new_params = recursify.recursify(config, params, 2, "cycle", "average",
                                               lora_rank=4)
  got = effective_kernels(new_config, new_params)[3]["mlp/wo"]
  slot = np.asarray(new_params["decoder"]["layers"]["mlp"]["wo"]["kernel"][1], np.float64)
  residual = np.asarray(params["decoder"]["layers"]["mlp"]["wo"]["kernel"][3], np.float64) - slot
  u, s, vt = np.linalg.svd(residual)
  np.testing.assert_allclose(got - slot, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-6)


def test_zero_lora_init_keeps_the_tied_model():
  config, params = source()
  plain_config, plain = recursify.recursify(config, params, 3, "cycle", "average")
  lora_config, lora = recursify.recursify(config, params, 3, "cycle", "average", lora_rank=4,
                                          lora_init="zero", lora_bias=True)
  batch = batch_of(config)
  np.testing.assert_array_equal(logits(lora_config, lora, batch),
                                logits(plain_config, plain, batch))


@pytest.mark.parametrize("kwargs,match", [
    ({"num_unique": 4, "order": "sequence"}, "model.sharing.num_unique=4 does not divide"),
    ({"num_unique": 2, "order": "middle_cycle"}, "order='middle_cycle'"),
    ({"num_unique": 3, "order": "cycle", "init": "first"}, "init='first' is not valid"),
])
def test_bad_recursify_arguments_name_the_field(kwargs, match):
  config, params = source()
  with pytest.raises(config_lib.ConfigError, match=match):
    recursify.recursify(config, params, **kwargs)


def test_refuses_a_looped_source():
  config, params = source()
  config.model.sharing = config_lib.sharing_config()
  config.model.loop.core = 2
  with pytest.raises(config_lib.ConfigError, match="model.loop.core"):
    recursify.recursify(config, params, 3, "cycle")


def test_hf_bert_directory_equals_hf_with_the_reconstructed_weights(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  torch.manual_seed(0)
  hf = transformers.BertForMaskedLM(transformers.BertConfig(**HF_SMALL)).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.normal_(0.0, 0.2)
    for module in hf.modules():
      if isinstance(module, torch.nn.LayerNorm):
        module.weight.add_(1.0)
  hf.save_pretrained(tmp_path / "hf")
  m, rank, n = 2, 4, HF_SMALL["num_hidden_layers"]
  config, params = recursify.load_source(str(tmp_path / "hf"))
  config, params = recursify.recursify(config, params, m, "cycle", "average", lora_rank=rank,
                                       lora_bias=True)
  interop.write_checkpoint(config, params, tmp_path / "wd")
  config, params, step = interop.read_checkpoint(tmp_path / "wd")
  assert step == 0

  # The reconstruction formula, in torch on HF's own [out, in] weights: slot s = mean of its
  # layers; applied layer i = slot + rank-r truncated SVD of (W_i - slot); biases b_i
  # (slot bias + offset); norms the slot mean (shared).
  reference = transformers.BertForMaskedLM(hf.config).eval()
  reference.load_state_dict(hf.state_dict())
  layers = hf.bert.encoder.layer
  linears = ["attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense"]
  norms = ["attention.output.LayerNorm", "output.LayerNorm"]
  with torch.no_grad():
    for i in range(n):
      same = [j for j in range(n) if j % m == i % m]
      target = reference.bert.encoder.layer[i]
      for name in linears:
        weight = lambda j: layers[j].get_submodule(name).weight.double()  # noqa: E731
        slot = sum(weight(j) for j in same) / len(same)
        u, s, vt = torch.linalg.svd(weight(i) - slot)
        target.get_submodule(name).weight.copy_(slot + (u[:, :rank] * s[:rank]) @ vt[:rank])
      for name in norms:
        for leaf in ("weight", "bias"):
          mean = sum(getattr(layers[j].get_submodule(name), leaf) for j in same) / len(same)
          getattr(target.get_submodule(name), leaf).copy_(mean)
  tokens = np.random.default_rng(0).integers(1, HF_SMALL["vocab_size"], (2, 12))
  mask = np.ones_like(tokens)
  mask[1, 9:] = 0
  with torch.no_grad():
    expect = reference(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
  got = models.build(config).apply({"params": params}, {"inputs": tokens, "input_mask": mask})
  np.testing.assert_allclose(np.asarray(got), expect.numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_cli_recursifies_a_workdir_that_launch_train_continues(tmp_path, data_dir):
  config, params = source(num_layers=4, vocab_size=260)
  config.data.data_dir = str(data_dir)
  config.data.seq_len, config.model.max_len = 8, 8
  interop.write_checkpoint(config, params, tmp_path / "src")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,  # noqa: E731
                                     capture_output=True, text=True, timeout=600)
  out = run("launch.recursify", f"--from={tmp_path / 'src'}", f"--workdir={tmp_path / 'rec'}",
            "--num_unique=2", "--order=cycle", "--init=stepwise", "--lora_rank=2")
  assert out.returncode == 0, out.stderr[-3000:]
  command = (f"python -m launch.train --config=configs/workdir.py:{tmp_path / 'rec'} "
             f"--workdir={tmp_path / 'rec'}")
  assert command in out.stdout
  out = run(*command.split()[2:], "--config.train.num_steps=2", "--config.train.batch_size=8",
            "--config.train.warmup_steps=1", "--config.train.log_every_steps=1",
            "--config.train.eval_every_steps=2", "--config.data.eval_batches=1")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Resumed from" in out.stderr and "at step 0" in out.stderr
  assert sorted(logged_losses(tmp_path / "rec")) == [1, 2]
  bad = run("launch.recursify", f"--from={tmp_path / 'src'}", f"--workdir={tmp_path / 'bad'}",
            "--num_unique=3", "--order=sequence")
  assert bad.returncode == 2 and "num_unique=3 does not divide num_layers=4" in bad.stderr
