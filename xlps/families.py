"""Model families: one registry entry each (plain Python; importing it loads no JAX).

An entry says everything the rest of xlps needs to know about a family: its Flax module
(imported when a model is built), its stacks of blocks with the components each block
applies and the parameter group each component reads (tying is two components naming one
group), the batch keys the module reads, and the batch layout the data pipeline makes for
it. Adding a family is one entry here plus its module.

Batch keys, one convention for every family (Flax lm1b / t5x names; int32, shape
``(batch, length)``; what a family reads is in its entry):

=================  =====================================================================
``inputs``         token ids the model reads (encoder_mlm: after masking; encoder_decoder:
                   the source, 0 = padding)
``targets``        token ids the loss predicts (decoder_lm: the next token; encoder_mlm:
                   the original token; encoder_decoder: the target, 0 = padding)
``weights``        float32 loss weight of each target (0 = not scored)
``positions``      position ids (default ``0 .. length-1``)
``segment_ids``    packing: a token attends within its own segment only; 0 = padding
``input_mask``     1 = token, 0 = padding, masked as keys only (as BERT does)
``token_types``    BERT / ALBERT sentence A/B ids
``decoder_inputs`` teacher-forcing decoder inputs (default: ``targets`` shifted right)
=================  =====================================================================

Hugging Face names map as ``input_ids -> inputs``, ``attention_mask -> input_mask``,
``token_type_ids -> token_types``, ``position_ids -> positions``, ``labels -> targets``
(``xlps.interop.huggingface.from_hf_batch``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids", "input_mask",
              "token_types", "decoder_inputs")
BLOCK = ("attention", "mlp", "norms")
# Batch layouts the data pipeline makes (xlps.data.pipeline) and the dataset kinds each can
# be made from: "text" corpora (documents) and "seq2seq" (source / target pairs).
LAYOUT_DATASETS = {"lm": ("text", "seq2seq"), "mlm": ("text",), "seq2seq": ("seq2seq",),
                   "puzzle": ("puzzle",)}
# Tokens of each layout's batches: batch key whose positions the model runs on (processed
# tokens, padding included) -> batch key whose non-zero entries mark the useful (non-pad)
# ones. lm: ``segment_ids`` (0 after the last packed segment, or after ``source EOS
# target`` in a seq2seq row); mlm: ``input_mask``; seq2seq: the source ``inputs`` and the
# ``targets`` themselves (0 = padding; a decoder position is useful when it predicts a
# token); puzzle: grid cells (0 = padding outside the grid). A batch without the marking
# key has no padding.
LAYOUT_TOKENS = {"lm": {"inputs": "segment_ids"}, "mlm": {"inputs": "input_mask"},
                 "seq2seq": {"inputs": "inputs", "targets": "targets"},
                 "puzzle": {"inputs": "inputs"}}


@dataclasses.dataclass(frozen=True)
class StackSpec:
  """A stack of applied blocks, before its sharing plan is resolved."""

  name: str
  num_layers: int
  components: tuple[str, ...]
  # component -> "owner/group" parameter group; default "<name>/<component>" (its own).
  groups: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family: module, stacks, batch keys and batch layout."""

  module: str                               # "package.module:Class"
  layout: str                               # key of LAYOUT_DATASETS
  inputs: tuple[str, ...]                   # batch keys the module needs
  optional_inputs: tuple[str, ...]          # batch keys the module reads when present
  stacks: Callable[[Mapping], tuple[StackSpec, ...]]  # from the model config section
  generates: str | None = None              # the stack decoding runs with a K/V cache
  # A module with the family's own ``train_step`` / ``eval_step`` (the signatures of
  # xlps.train's), used where ``uses_steps(spec)`` holds for the ModelSpec; else xlps.train's.
  steps: str | None = None
  uses_steps: Callable[[Any], bool] = lambda spec: False


def _encoder_decoder_stacks(m: Mapping) -> tuple[StackSpec, ...]:
  """Encoder and decoder; with ``tie_encoder_decoder`` the decoder's self-attention and FFN
  are the encoder's groups, and its own norms and cross-attention live beside them."""
  decoder = StackSpec("decoder", m["num_decoder_layers"] or m["num_layers"],
                      (*BLOCK, "cross_attention"))
  if m["tie_encoder_decoder"]:
    decoder = dataclasses.replace(decoder, groups={
        "attention": "encoder/attention", "mlp": "encoder/mlp",
        "norms": "encoder/decoder_norms", "cross_attention": "encoder/cross_attention"})
  return StackSpec("encoder", m["num_layers"], BLOCK), decoder


FAMILIES: dict[str, Family] = {
    # Causal decoder-only LM (GPT shape; Universal Transformer when M = 1).
    "decoder_lm": Family(
        module="xlps.models.transformer:DecoderLM", layout="lm", inputs=("inputs",),
        optional_inputs=("segment_ids", "positions"),
        stacks=lambda m: (StackSpec("decoder", m["num_layers"], BLOCK),), generates="decoder"),
    # Bidirectional encoder with an MLM head (ALBERT / BERT shape).
    "encoder_mlm": Family(
        module="xlps.models.transformer:EncoderMLM", layout="mlm", inputs=("inputs",),
        optional_inputs=("input_mask", "token_types", "positions"),
        stacks=lambda m: (StackSpec("encoder", m["num_layers"], BLOCK),)),
    # Encoder-decoder Transformer (the seed article's model), optionally tied.
    "encoder_decoder": Family(
        module="xlps.models.transformer:EncoderDecoder", layout="seq2seq",
        inputs=("inputs", "targets"), optional_inputs=("decoder_inputs",),
        stacks=_encoder_decoder_stacks, generates="decoder"),
    # Non-causal net over a fixed grid, one answer token per cell (Sudoku, mazes, ARC); with
    # model.recursion, TRM / HRM latent recursion trained by deep supervision.
    "puzzle": Family(
        module="xlps.models.transformer:PuzzleNet", layout="puzzle", inputs=("inputs",),
        optional_inputs=(), stacks=lambda m: (StackSpec("net", m["num_layers"], BLOCK),),
        steps="xlps.models.controllers.recursion",
        uses_steps=lambda spec: spec.recursion is not None),
}


def processed_tokens(family: str, batch: Mapping[str, Any]) -> int:
  """Positions of ``batch`` that ``family``'s model runs on, padding included (LAYOUT_TOKENS;
  static: from shapes only)."""
  return sum(batch[key].size for key in LAYOUT_TOKENS[FAMILIES[family].layout])


def useful_tokens(family: str, batch: Mapping[str, Any]) -> Any:
  """The non-pad ones among ``processed_tokens`` (LAYOUT_TOKENS); a traced array sum under
  ``jit``, so counting costs no host sync."""
  return sum(((batch[mark] != 0).sum() if mark in batch else batch[key].size)
             for key, mark in LAYOUT_TOKENS[FAMILIES[family].layout].items())
