"""Tokenizers: byte-level (default) and SentencePiece trained locally on the train split.

Both share the special ids, so pipelines never branch on the tokenizer:

    id   0  PAD   padding (and "no token"); weights are 0 there
    id   1  BOS   starts every text document (the first input of a packed segment)
    id   2  EOS   ends every document and every seq2seq target
    id   3  MASK  the [MASK] of encoder_mlm
    byte tokenizer:          ids 4..259 are the bytes 0..255 (id = byte + 4); vocab 260
    sentencepiece tokenizer: id 4 is <unk>, then the 256 byte-fallback pieces <0x00>..<0xFF>,
                             then the learned pieces; vocab = data.sp_vocab_size

The byte tokenizer accepts any bytes (text need not be UTF-8). SentencePiece works on
Unicode text, so its callers reject non-UTF-8 input; byte fallback keeps any character
it did not learn encodable.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable

import numpy as np

from xlps.config import ConfigError

PAD, BOS, EOS, MASK = 0, 1, 2, 3
NUM_SPECIAL = 4
BYTE_VOCAB_SIZE = NUM_SPECIAL + 256
# SentencePiece: pieces that are never produced by encoding ordinary text (specials, <unk>).
_SP_NUM_RESERVED = NUM_SPECIAL + 1


class ByteTokenizer:
  """UTF-8 (or any) bytes shifted past the special ids."""

  name = "byte"
  vocab_size = BYTE_VOCAB_SIZE
  first_regular_id = NUM_SPECIAL

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids (int32) of ``text`` without specials; ``str`` is encoded as UTF-8."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int32) + NUM_SPECIAL

  def decode(self, ids: Iterable[int]) -> bytes:
    """Bytes of the regular ids in ``ids`` (specials and padding are dropped)."""
    ids = np.fromiter(ids, np.int64)
    return (ids[ids >= NUM_SPECIAL] - NUM_SPECIAL).astype(np.uint8).tobytes()


class SentencePieceTokenizer:
  """A SentencePiece model with the shared special ids (see the module docstring)."""

  name = "sentencepiece"
  first_regular_id = _SP_NUM_RESERVED

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # optional dependency: the `sentencepiece` extra
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = int(self._sp.get_piece_size())

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids (int32) of ``text``; bytes must be UTF-8 (callers check and name the file)."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids: Iterable[int]) -> bytes:
    """UTF-8 bytes of the regular ids in ``ids`` (specials and padding are dropped)."""
    ids = [int(i) for i in ids if int(i) >= NUM_SPECIAL]
    return self._sp.decode(ids).encode("utf-8")


def require_sentencepiece() -> None:
  """Raises a ValueError that says how to install the optional package."""
  try:
    import sentencepiece  # noqa: F401
  except ImportError as e:
    raise ConfigError("data.tokenizer='sentencepiece' needs the `sentencepiece` package: "
                      "pip install sentencepiece (or the xlps 'sentencepiece' extra)") from e


def train_sentencepiece(texts: Iterable[str], vocab_size: int, path: str) -> None:
  """Trains a unigram SentencePiece model on ``texts`` (code-friendly: no whitespace
  normalisation, byte fallback) and writes it to ``path`` atomically."""
  import sentencepiece as spm
  if vocab_size < _SP_NUM_RESERVED + 256 + 1:
    raise ConfigError(f"data.sp_vocab_size={vocab_size} is too small: the 256 byte-fallback "
                      f"pieces and {_SP_NUM_RESERVED} special pieces need sp_vocab_size >= "
                      f"{_SP_NUM_RESERVED + 256 + 1}")

  def lines():
    for text in texts:
      yield from filter(None, text.splitlines())

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=NUM_SPECIAL, control_symbols=["[MASK]"],
        byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        input_sentence_size=100_000, shuffle_input_sentence=True, max_sentence_length=1 << 16,
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    # e.g. "Vocabulary size is too high": the train split has too few distinct pieces.
    raise ConfigError(f"data.sp_vocab_size={vocab_size}: SentencePiece training failed on "
                      f"the train split ({e}); try a smaller sp_vocab_size") from e
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, path)
