"""Hugging Face ``transformers`` ALBERT / BERT <-> xlps ``encoder_mlm``.

``load_hf`` reads an ``AlbertModel`` / ``AlbertForMaskedLM`` / ``BertModel`` /
``BertForMaskedLM`` (in memory, or a ``save_pretrained`` directory with safetensors
weights) into an xlps config and parameter tree; ``save_hf`` writes a directory that
``AlbertForMaskedLM`` / ``BertForMaskedLM.from_pretrained`` load. Weights are copied
bitwise (transposes and reshapes only), so both directions round-trip exactly.

Layer sharing: ALBERT applies ``num_hidden_layers`` N times a group of ``inner_group_num``
k distinct layers, group ``int(i / (N / G))`` for ``num_hidden_groups`` G. In xlps that is
applied depth N * k over M = G * k slots, slot ``group * k + j``: order ``sequence`` when
k = 1 and G | N, else an explicit ``table``. BERT is N unshared layers (``sequence``, M = N).
``save_hf`` writes BERT for ``embed_dim == d_model`` with unshared layers, else ALBERT with
the smallest k that reproduces the slot table (so ``cycle`` with M | N is G = 1, k = M).

Tokenizer: ``load_hf`` takes the model's tokenizer from ``tokenizer=`` or from the
snapshot directory's own tokenizer files (``xlps.data.tokenizers.load``), checks its
vocabulary and special ids against the HF config, and sets ``data.tokenizer='file'`` with
``data.tokenizer_path``; without one, ``data.tokenizer_path`` stays empty and training asks
for it instead of feeding byte ids to a WordPiece / SentencePiece embedding. ``save_hf``
writes the tokenizer's pad / BOS / EOS ids into the HF config (null when unknown) and its
files next to the weights.

A model without an MLM head (``AlbertModel`` / ``BertModel``) gets a freshly initialised
head (``config.seed``, ``model.init_std`` = ``initializer_range``); a pooler present in the
HF model sets ``model.pooler=True`` and is mapped. ``save_hf`` writes the MLM model and,
with ``model.pooler``, the pooler weights (which ``AlbertModel`` / ``BertModel`` load and
the MLM classes ignore).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import safetensors.torch
import torch
import transformers

from xlps import config as config_lib
from xlps import models
from xlps import presets
from xlps.config import ConfigError
from xlps.data import tokenizers as tok_lib

# HF hidden_act -> xlps activation; xlps -> HF on save.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu"}
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_PREFIXES = {"albert": "albert.", "bert": "bert."}  # base model, in the *ForMaskedLM classes
_HEAD_PREFIXES = {"albert": "", "bert": "cls."}
# Per-layer modules: xlps "component/module" -> HF module under the layer's prefix.
_LAYER_MODULES = {
    "albert": {"attention/query": "attention.query", "attention/key": "attention.key",
               "attention/value": "attention.value", "attention/out": "attention.dense",
               "mlp/wi": "ffn", "mlp/wo": "ffn_output",
               "norms/attention": "attention.LayerNorm", "norms/mlp": "full_layer_layer_norm"},
    "bert": {"attention/query": "attention.self.query", "attention/key": "attention.self.key",
             "attention/value": "attention.self.value", "attention/out": "attention.output.dense",
             "mlp/wi": "intermediate.dense", "mlp/wo": "output.dense",
             "norms/attention": "attention.output.LayerNorm", "norms/mlp": "output.LayerNorm"},
}
# Everything else: xlps module (or array) path -> HF module (or array) name, without the
# base model prefix; the MLM head is "predictions." (BERT's "cls." is dropped).
_GLOBAL_NAMES = {
    "albert": {"embedder/embedding": "embeddings.word_embeddings.weight",
               "embedder/position_embedding": "embeddings.position_embeddings.weight",
               "embedder/type_embedding": "embeddings.token_type_embeddings.weight",
               "embedder/norm": "embeddings.LayerNorm",
               "embedder/projection": "encoder.embedding_hidden_mapping_in",
               "pooler": "pooler", "head/transform": "predictions.dense",
               "head/transform_norm": "predictions.LayerNorm", "head/bias": "predictions.bias"},
    "bert": {"embedder/embedding": "embeddings.word_embeddings.weight",
             "embedder/position_embedding": "embeddings.position_embeddings.weight",
             "embedder/type_embedding": "embeddings.token_type_embeddings.weight",
             "embedder/norm": "embeddings.LayerNorm", "pooler": "pooler.dense",
             "head/transform": "predictions.transform.dense",
             "head/transform_norm": "predictions.transform.LayerNorm",
             "head/bias": "predictions.bias"},
}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_MLM_CLASSES = {"albert": transformers.AlbertForMaskedLM, "bert": transformers.BertForMaskedLM}
# Hugging Face batch key -> xlps batch key (the convention is in ``xlps.families``).
HF_BATCH_KEYS = {"input_ids": "inputs", "attention_mask": "input_mask",
                 "token_type_ids": "token_types", "position_ids": "positions", "labels": "targets"}


def from_hf_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
  """A Hugging Face batch (``input_ids``, ``attention_mask``, ...) under xlps's keys."""
  unknown = sorted(set(batch) - set(HF_BATCH_KEYS))
  if unknown:
    raise ValueError(f"HF batch keys {unknown} have no xlps counterpart; known: "
                     f"{', '.join(HF_BATCH_KEYS)}")
  return {HF_BATCH_KEYS[key]: value for key, value in batch.items()}


# ------------------------------------------------------------------------ sharing layout


def _albert_slots(num_layers: int, num_groups: int, inner_group_num: int = 1) -> list[int]:
  """xlps slot of each applied layer of an HF ALBERT (its group formula, float division)."""
  return [int(i / (num_layers / num_groups)) * inner_group_num + j
          for i in range(num_layers) for j in range(inner_group_num)]


def _albert_layout(slots: tuple[int, ...], num_unique: int) -> tuple[int, int, int] | None:
  """``(num_hidden_layers, num_hidden_groups, inner_group_num)`` giving ``slots``, or None."""
  applied = len(slots)
  for k in range(1, math.gcd(num_unique, applied) + 1):
    if num_unique % k == 0 and applied % k == 0:
      n, g = applied // k, num_unique // k
      if _albert_slots(n, g, k) == list(slots):
        return n, g, k
  return None


# ----------------------------------------------------------------------- name mapping


def _links(config: ml_collections.ConfigDict, arch: str, inner_group_num: int = 1) -> list[tuple]:
  """``(xlps_path, slot, hf_key, xlps_shape, hf_shape, transpose)`` for every weight.

  ``slot`` is None for unstacked parameters and shapes are per slot; HF keys have no base
  model prefix. Dense kernels are stored transposed in HF (``(out, in)``, heads flattened).
  """
  spec = models.spec_of(config)
  groups = spec.groups()
  shapes = models.param_shapes(spec)
  k = inner_group_num
  layer_prefix = ((lambda s: f"encoder.layer.{s}.") if arch == "bert" else
                  (lambda s: f"encoder.albert_layer_groups.{s // k}.albert_layers.{s % k}."))
  links = []
  for path in shapes:
    leaf = path[-1]
    group = groups.get(path[:3])
    stacked = group is not None and group.num_unique > 1
    shape = shapes[path][1:] if stacked else shapes[path]
    if group is not None:
      module = _LAYER_MODULES[arch]["/".join(path[2:4])]
      keys = [(s if stacked else None, f"{layer_prefix(s)}{module}.{_LEAF_NAMES[leaf]}")
              for s in range(group.num_unique)]
    else:
      names = _GLOBAL_NAMES[arch]
      joined, module = "/".join(path), "/".join(path[:-1])
      if joined in names:
        keys = [(None, names[joined])]
      elif module in names:
        keys = [(None, f"{names[module]}.{_LEAF_NAMES[leaf]}")]
      else:
        raise ConfigError(f"xlps parameter {joined} has no Hugging Face {arch} counterpart")
    if leaf == "kernel":  # HF (out, in): out is the size of the layer's bias
      out = math.prod(shapes[(*path[:-1], "bias")][1 if stacked else 0:])
      hf_shape = (out, math.prod(shape) // out)
    else:
      hf_shape = (math.prod(shape),) if leaf in ("bias", "scale") else shape
    links += [(path, slot, key, shape, hf_shape, leaf == "kernel") for slot, key in keys]
  return links


# ------------------------------------------------------------------------------- load


def _hf_config_and_weights(path_or_model) -> tuple[Any, dict[str, np.ndarray]]:
  if isinstance(path_or_model, torch.nn.Module):
    hf = path_or_model.config
    tensors = path_or_model.state_dict()
  else:
    directory = pathlib.Path(path_or_model)
    hf = transformers.AutoConfig.from_pretrained(directory)
    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.exists() else ["model.safetensors"])
    if not (directory / files[0]).exists():
      raise ConfigError(f"{directory} has no model.safetensors (or its index); save the model "
                        "with save_pretrained(safe_serialization=True)")
    tensors = {}
    for name in files:
      tensors.update(safetensors.torch.load_file(directory / name))
  return hf, {k: v.detach().to(torch.float32).cpu().numpy() for k, v in tensors.items()}


def _strip(key: str, arch: str) -> str:
  for prefix in (_PREFIXES[arch], _HEAD_PREFIXES[arch]):
    if key.startswith(prefix):
      return key[len(prefix):]
  return key


def _xlps_config(hf, pooler: bool) -> ml_collections.ConfigDict:
  arch = hf.model_type
  config = config_lib.base_config()
  presets.apply(config, "base" if arch == "albert" else "bert_base")  # then HF's shape below
  if hf.hidden_act not in _ACTIVATIONS:
    raise ConfigError(f"hidden_act={hf.hidden_act!r} has no xlps activation; supported: "
                      f"{', '.join(_ACTIVATIONS)}")
  if getattr(hf, "position_embedding_type", "absolute") != "absolute":
    raise ConfigError(f"position_embedding_type={hf.position_embedding_type!r} is not supported; "
                      "xlps has learned absolute positions only")
  if not getattr(hf, "tie_word_embeddings", True):
    raise ConfigError("tie_word_embeddings=False is not supported: the xlps MLM head is tied to "
                      "the word embeddings")
  m = config.model
  m.vocab_size, m.d_model = hf.vocab_size, hf.hidden_size
  m.num_heads, m.d_ff = hf.num_attention_heads, hf.intermediate_size
  m.max_len, m.type_vocab_size = hf.max_position_embeddings, hf.type_vocab_size
  config.data.seq_len = min(config.data.seq_len, m.max_len)  # positions the model has
  m.norm_eps, m.activation = float(hf.layer_norm_eps), _ACTIVATIONS[hf.hidden_act]
  m.dropout_rate = float(hf.hidden_dropout_prob)
  m.attention_dropout_rate = float(hf.attention_probs_dropout_prob)
  m.init_std, m.pooler = float(hf.initializer_range), pooler
  n = hf.num_hidden_layers
  if arch == "bert":
    m.embed_dim, m.num_layers = 0, n
    m.sharing.num_unique, m.sharing.order = n, "sequence"
    return config
  g, k = hf.num_hidden_groups, hf.inner_group_num
  if hf.embedding_size >= hf.hidden_size:
    raise ConfigError(f"ALBERT embedding_size={hf.embedding_size} >= hidden_size="
                      f"{hf.hidden_size}: xlps has the E->H mapping only for embed_dim < d_model")
  if not 1 <= g <= n:
    raise ConfigError(f"ALBERT num_hidden_groups={g}, inner_group_num={k} with "
                      f"num_hidden_layers={n}: every group must be used (1 <= groups <= layers)")
  m.embed_dim, m.num_layers = hf.embedding_size, n * k
  m.sharing.num_unique = g * k
  if k == 1 and n % g == 0:
    m.sharing.order = "sequence"
  else:
    m.sharing.order = "table"
    m.sharing.table = " ".join(map(str, _albert_slots(n, g, k)))
  return config


def _snapshot_has_tokenizer(directory: pathlib.Path) -> bool:
  return (directory / "tokenizer.json").is_file() or any(directory.glob("*.model"))


def check_hf_tokenizer(hf, tokenizer: tok_lib.Tokenizer, where: str) -> None:
  """ConfigError naming both unless ``tokenizer``'s vocabulary size and pad / BOS / EOS ids
  are those of the HF config ``hf`` (ids the config leaves unset are not compared)."""
  pairs = (("vocab_size", hf.vocab_size, tokenizer.vocab_size),
           ("pad_token_id", getattr(hf, "pad_token_id", None), tokenizer.pad_id),
           ("bos_token_id", getattr(hf, "bos_token_id", None), tokenizer.bos_id),
           ("eos_token_id", getattr(hf, "eos_token_id", None), tokenizer.eos_id))
  wrong = [f"{name}={theirs} (tokenizer: {ours})" for name, theirs, ours in pairs
           if theirs is not None and theirs != ours]
  if wrong:
    raise ConfigError(f"the tokenizer {tokenizer.describe()} does not match the HF model "
                      f"{where}: {', '.join(wrong)}; valid: the tokenizer the model was "
                      "trained with")


def load_hf(path_or_model: str | os.PathLike | torch.nn.Module,
            tokenizer: str | os.PathLike | None = None) -> tuple[ml_collections.ConfigDict, dict]:
  """``(config, params)`` of an HF ALBERT / BERT model or ``save_pretrained`` directory.

  ``config`` is a full xlps config: preset ``base`` / ``bert_base`` of ``xlps.presets`` (as
  in ``configs/albert.py``) with the model keys taken from the HF config; ``params`` are
  float32 numpy arrays in the exact structure of ``nn.unbox(models.init_params(config))``.
  ``tokenizer`` (a path for ``xlps.data.tokenizers.load``; default: the directory's own
  tokenizer files, if any) becomes ``data.tokenizer='file'`` with ``data.tokenizer_path``
  after ``check_hf_tokenizer``; without one the path stays '' (see the module docstring).
  """
  hf, raw = _hf_config_and_weights(path_or_model)
  arch = hf.model_type
  if arch not in _PREFIXES:
    raise ConfigError(f"model_type={arch!r} is not supported; expected 'albert' or 'bert'")
  if tokenizer is None and not isinstance(path_or_model, torch.nn.Module) and \
      _snapshot_has_tokenizer(pathlib.Path(path_or_model)):
    tokenizer = path_or_model
  tokenizer_path = "" if tokenizer is None else os.path.abspath(os.fspath(tokenizer))
  if tokenizer_path:
    where = ("in memory" if isinstance(path_or_model, torch.nn.Module)
             else os.fspath(path_or_model))
    check_hf_tokenizer(hf, tok_lib.load(tokenizer_path, field="tokenizer"), where)
  weights = {_strip(k, arch): v for k, v in raw.items()}
  has_head = "predictions.bias" in weights
  config = _xlps_config(hf, pooler=any(k.startswith("pooler.") for k in weights))
  for name, tied in (("predictions.decoder.weight", "embeddings.word_embeddings.weight"),
                     ("predictions.decoder.bias", "predictions.bias")):
    if name in weights and not np.array_equal(weights.pop(name), weights[tied]):
      raise ConfigError(f"{name} differs from {tied}; xlps ties the MLM decoder")
  flat: dict[tuple[str, ...], dict] = {}
  links = _links(config, arch, getattr(hf, "inner_group_num", 1))
  for path, slot, key, shape, hf_shape, transpose in links:
    if path[0] == "head" and not has_head:
      continue
    if key not in weights:
      raise ConfigError(f"the HF {arch} weights lack {key} (for xlps {'/'.join(path)})")
    value = weights.pop(key)
    if value.shape != hf_shape:
      raise ConfigError(f"{key} has shape {value.shape}; the config implies {hf_shape}")
    flat.setdefault(path, {})[slot] = (value.T if transpose else value).reshape(shape)
  if weights:
    raise ConfigError(f"HF weights with no xlps counterpart: {sorted(weights)}")
  params: dict = {}
  for path, by_slot in flat.items():
    value = by_slot[None] if None in by_slot else np.stack([by_slot[s] for s in sorted(by_slot)])
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.ascontiguousarray(value, np.float32)
  if not has_head:
    init = jax.jit(models.init_params, static_argnums=(0, 1))  # one compile, not per op
    fresh = nn.unbox(init(models.spec_of(config), config.seed))["head"]
    params["head"] = jax.tree.map(lambda v: np.array(v, np.float32), fresh)
  expected = models.param_shapes(config)
  got = {p: v.shape for p, v in _flatten(params).items()}
  assert got == expected, f"converted parameters {got} != xlps structure {expected}"
  config.data.tokenizer, config.data.tokenizer_path = "file", tokenizer_path
  return config, params


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, (*prefix, key)))
    else:
      out[(*prefix, key)] = value
  return out


# ------------------------------------------------------------------------------- save


def _arch_of(config: ml_collections.ConfigDict) -> str:
  """'albert' or 'bert' for a config HF can express; ValueError naming what it cannot."""
  s = models.spec_of(config)
  problems = []
  for ok, what in (
      (s.family == "encoder_mlm", f"family={s.family!r} (needs 'encoder_mlm')"),
      (s.norm_position == "post", f"norm_position={s.norm_position!r} (needs 'post')"),
      (s.norm == "layernorm", f"norm={s.norm!r} (needs 'layernorm')"),
      (s.embed_norm, "embed_norm=False (needs True)"),
      (not s.scale_embeddings, "scale_embeddings=True (needs False)"),
      (s.activation in _HF_ACTIVATIONS,
       f"activation={s.activation!r} (needs one of {', '.join(_HF_ACTIVATIONS)})"),
      (s.num_kv_heads == s.num_heads,
       f"num_kv_heads={s.num_kv_heads} != num_heads={s.num_heads}"),
      (s.position_embedding == "learned",
       f"position_embedding={s.position_embedding!r} (needs 'learned')"),
      (s.type_vocab_size >= 1, "type_vocab_size=0 (needs >= 1)"),
      (s.use_bias, "use_bias=False"),
      (s.tie_embeddings, "tie_embeddings=False"),
  ):
    if not ok:
      problems.append(what)
  plans = s.stack_plans("encoder") if s.family == "encoder_mlm" else {}
  slot_tables = {comp: plan.slots for comp, plan in plans.items()}
  if len(set(slot_tables.values())) > 1:
    problems.append(f"per-component sharing plans differ ({slot_tables})")
  if problems:
    raise ConfigError("Hugging Face ALBERT / BERT cannot express model." + "; model.".join(problems))
  plan = plans["attention"]
  if s.embed_dim < s.d_model:
    if _albert_layout(plan.slots, plan.num_unique) is None:
      raise ConfigError(f"sharing slots {list(plan.slots)} are not an ALBERT layout (layer i of N "
                        "uses group int(i / (N / G)), each group k distinct layers); use "
                        "order='sequence' or that table")
    return "albert"
  if plan.slots != tuple(range(plan.num_layers)):
    raise ConfigError(f"embed_dim == d_model with sharing slots {list(plan.slots)}: the BERT "
                      "format has no sharing and HF ALBERT always has an E->H mapping, which "
                      "xlps creates only for embed_dim < d_model")
  return "bert"


def _albert_config_values(config: ml_collections.ConfigDict) -> dict[str, int]:
  plan = models.spec_of(config).stack_plans("encoder")["attention"]
  n, g, k = _albert_layout(plan.slots, plan.num_unique)
  return {"num_hidden_layers": n, "num_hidden_groups": g, "inner_group_num": k}


def config_tokenizer(config: ml_collections.ConfigDict) -> tok_lib.Tokenizer | None:
  """The tokenizer ``config.data`` names, where known without data: byte, a tokenizer file,
  or None (a converted model without one; a locally trained SentencePiece, which has xlps's
  ids but lives with its run: pass the run's, ``xlps.data.run_tokenizer``)."""
  d = config.data
  if d.tokenizer == "byte":
    return tok_lib.ByteTokenizer()
  if d.tokenizer == "file" and d.tokenizer_path:
    return tok_lib.load(d.tokenizer_path)
  return None


def hf_config(config: ml_collections.ConfigDict,
              tokenizer: tok_lib.Tokenizer | None = None) -> transformers.PretrainedConfig:
  """The ``AlbertConfig`` / ``BertConfig`` of an xlps config (ValueError if inexpressible);
  pad / BOS / EOS ids are ``tokenizer``'s (default ``config_tokenizer``), null if unknown."""
  arch, s = _arch_of(config), models.spec_of(config)
  tokenizer = tokenizer or config_tokenizer(config)
  ids = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
  if tokenizer is not None:
    ids = {"pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id,
           "eos_token_id": tokenizer.eos_id}
  common = dict(
      vocab_size=s.vocab_size, hidden_size=s.d_model, num_attention_heads=s.num_heads,
      intermediate_size=s.d_ff, hidden_act=_HF_ACTIVATIONS[s.activation],
      hidden_dropout_prob=s.dropout_rate, attention_probs_dropout_prob=s.attention_dropout_rate,
      max_position_embeddings=s.max_len, type_vocab_size=s.type_vocab_size,
      initializer_range=s.init_std, layer_norm_eps=s.norm_eps,
      architectures=[_MLM_CLASSES[arch].__name__], **ids)
  if arch == "bert":
    return transformers.BertConfig(num_hidden_layers=s.num_layers, **common)
  return transformers.AlbertConfig(embedding_size=s.embed_dim, **_albert_config_values(config),
                                   **common)


def hf_state_dict(config: ml_collections.ConfigDict, params: Mapping) -> dict[str, torch.Tensor]:
  """The ``*ForMaskedLM`` state dict of ``params`` (tied decoder weights left out)."""
  arch = _arch_of(config)
  k = _albert_config_values(config)["inner_group_num"] if arch == "albert" else 1
  flat = _flatten(nn.unbox(params))
  shapes = {p: tuple(np.shape(v)) for p, v in flat.items()}
  expected = models.param_shapes(config)
  if shapes != expected:
    wrong = sorted(set(shapes.items()) ^ set(expected.items()))
    raise ConfigError(f"params do not match the config's parameters (path, shape): {wrong}")
  out = {}
  for path, slot, key, _, hf_shape, transpose in _links(config, arch, k):
    value = np.asarray(flat[path], np.float32)
    value = value if slot is None else value[slot]
    value = value.reshape(hf_shape[::-1]).T if transpose else value.reshape(hf_shape)
    prefix = _HEAD_PREFIXES[arch] if key.startswith("predictions.") else _PREFIXES[arch]
    out[prefix + key] = torch.tensor(np.ascontiguousarray(value))
  return out


def save_hf(config: ml_collections.ConfigDict, params: Mapping, directory: str | os.PathLike,
            tokenizer: tok_lib.Tokenizer | None = None) -> pathlib.Path:
  """Writes ``config.json`` + ``model.safetensors`` for ``Albert/BertForMaskedLM.from_pretrained``,
  and the tokenizer's files (``tokenizer``, default ``config_tokenizer``; none for byte).

  Raises ValueError for configs HF cannot express (pre-LN, RMSNorm, SwiGLU, GQA/MQA,
  differing per-component plans, non-ALBERT sharing layouts, ...) and for a tokenizer whose
  vocabulary is not the model's.
  """
  directory = pathlib.Path(directory)
  tensors = hf_state_dict(config, params)
  tokenizer = tokenizer or config_tokenizer(config)
  if tokenizer is not None and tokenizer.files and tokenizer.vocab_size != config.model.vocab_size:
    raise ConfigError(f"the tokenizer {tokenizer.describe()} does not match the model: "
                      f"model.vocab_size={config.model.vocab_size}")
  hf_config(config, tokenizer).save_pretrained(directory)
  if tokenizer is not None:
    tokenizer.save(directory)
  safetensors.torch.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
  return directory
