"""Tokenizers: byte-level (default), SentencePiece trained locally on the train split, and
tokenizers loaded from files (``load``): a SentencePiece ``.model``, a Hugging Face
``tokenizer.json`` (through the ``tokenizers`` library) or the tokenizer files of a local
HF snapshot directory.

Every tokenizer names its special ids (``pad_id``, ``bos_id``, ``eos_id``, ``mask_id``) and
the pipelines use those: BOS starts and EOS ends every text document, MASK is encoder_mlm's
[MASK]. The byte tokenizer and the locally trained SentencePiece model share xlps's ids:

    id   0  PAD   padding (and "no token"); weights are 0 there
    id   1  BOS   starts every text document (the first input of a packed segment)
    id   2  EOS   ends every document and every seq2seq target
    id   3  MASK  the [MASK] of encoder_mlm
    byte tokenizer:          ids 4..259 are the bytes 0..255 (id = byte + 4); vocab 260
    sentencepiece tokenizer: id 4 is <unk>, then the 256 byte-fallback pieces <0x00>..<0xFF>,
                             then the learned pieces; vocab = data.sp_vocab_size

A tokenizer loaded from files keeps its own ids, so a converted HF model is trained on the
ids its embedding rows belong to (an ALBERT ``spiece.model``: pad 0, [CLS] 2 as BOS, [SEP]
3 as EOS, [MASK] 4). Its special tokens come from the snapshot's
``special_tokens_map.json`` / ``tokenizer_config.json`` (BOS: ``cls_token``, else
``bos_token``; EOS: ``sep_token``, else ``eos_token``), else from the usual names
(``[CLS]`` / ``<s>``, ``[SEP]`` / ``</s>``, ``<pad>`` / ``[PAD]``, ``[MASK]`` / ``<mask>``).
``Tokenizer.save`` writes a directory that ``load`` reads back identically (a run keeps
its tokenizer in ``WORKDIR/tokenizer``, see ``xlps.data``).

The byte tokenizer accepts any bytes (text need not be UTF-8). SentencePiece works on
Unicode text, so its callers reject non-UTF-8 input; byte fallback keeps any character
it did not learn encodable.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from xlps.config import BYTE_VOCAB_SIZE, NUM_SPECIAL, ConfigError

# The NUM_SPECIAL special ids; the byte tokenizer's 256 byte values follow them (the config
# schema defines NUM_SPECIAL and BYTE_VOCAB_SIZE, so that xlps.config imports nothing of here).
PAD, BOS, EOS, MASK = 0, 1, 2, 3
# SentencePiece: pieces that are never produced by encoding ordinary text (specials, <unk>).
_SP_NUM_RESERVED = NUM_SPECIAL + 1
# What ``load`` accepts, for error messages.
VALID_FILES = ("a SentencePiece .model file, a Hugging Face tokenizer.json, or a local HF "
               "snapshot directory holding one of them")
# Special-token roles: the HF special_tokens_map keys naming each (first found wins), then
# the usual token strings.
_ROLES = {"pad": (("pad_token",), ("<pad>", "[PAD]")),
          "bos": (("cls_token", "bos_token"), ("[CLS]", "<s>")),
          "eos": (("sep_token", "eos_token"), ("[SEP]", "</s>")),
          "mask": (("mask_token",), ("[MASK]", "<mask>"))}
_SPECIAL_TOKENS_MAP = "special_tokens_map.json"
_SNAPSHOT_EXTRAS = ("tokenizer_config.json",)  # kept with the tokenizer (HF reads its class)


class Tokenizer:
  """What the pipelines and generation use: ``encode`` / ``decode``, the vocabulary size and
  the special ids. ``files`` (name -> bytes) is what ``save`` writes; empty for the byte
  tokenizer, which needs no file."""

  name: str
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  mask_id: int | None
  special_ids: tuple[int, ...]   # never selected for masking nor drawn as random tokens
  source: str = ""
  files: dict[str, bytes] = {}

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids (int32) of ``text``, without specials."""
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> bytes:
    """UTF-8 (byte tokenizer: raw) bytes of ``ids`` without the specials."""
    raise NotImplementedError

  @property
  def regular_ids(self) -> np.ndarray:
    """Every id that is not special (MLM's random replacements are drawn from these)."""
    return np.setdiff1d(np.arange(self.vocab_size, dtype=np.int32),
                        np.asarray(self.special_ids, np.int32))

  @property
  def fingerprint(self) -> str:
    """Equal for tokenizers that map text to the same ids (file contents and special ids)."""
    digest = hashlib.sha256(repr(self.ids()).encode())
    for name in sorted(self.files):
      if name != _SPECIAL_TOKENS_MAP:
        digest.update(self.files[name])
    return f"{self.name}:{digest.hexdigest()}"

  def ids(self) -> dict[str, int | None]:
    """The vocabulary size and the special ids (what a model's embedding rows depend on)."""
    return {"vocab": self.vocab_size, "pad": self.pad_id, "bos": self.bos_id,
            "eos": self.eos_id, "mask": self.mask_id}

  def describe(self) -> str:
    """One line: where it comes from, its kind, vocabulary and special ids."""
    where = f"{self.source} " if self.source else ""
    ids = ", ".join(f"{k} {v}" for k, v in self.ids().items() if k != "vocab" and v is not None)
    return f"{where}({self.name}, vocab {self.vocab_size}; {ids})"

  def save(self, directory: str | os.PathLike) -> None:
    """Writes ``files`` into ``directory`` (created; local or remote) for ``load``."""
    from etils import epath
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in self.files.items():
      (directory / name).write_bytes(data)


class ByteTokenizer(Tokenizer):
  """UTF-8 (or any) bytes shifted past the special ids."""

  name = "byte"
  vocab_size = BYTE_VOCAB_SIZE
  pad_id, bos_id, eos_id, mask_id = PAD, BOS, EOS, MASK
  special_ids = (PAD, BOS, EOS, MASK)

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids (int32) of ``text`` without specials; ``str`` is encoded as UTF-8."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int32) + NUM_SPECIAL

  def decode(self, ids: Iterable[int]) -> bytes:
    """Bytes of the regular ids in ``ids`` (specials and padding are dropped)."""
    ids = np.fromiter(ids, np.int64)
    return (ids[ids >= NUM_SPECIAL] - NUM_SPECIAL).astype(np.uint8).tobytes()


def _resolve(source: str, to_id: Callable[[str], int | None],
             special_tokens: Mapping[str, str] | None) -> dict[str, int | None]:
  """Each role's id: the special-tokens map's token, else the first usual name present."""
  found = {}
  for role, (keys, names) in _ROLES.items():
    named = [special_tokens[k] for k in keys if (special_tokens or {}).get(k)]
    for token in named or names:
      found[role] = to_id(token)
      if found[role] is None and named:
        raise ConfigError(f"tokenizer {source}: its special_tokens_map names {role} token "
                          f"{token!r}, which is not in its vocabulary")
      if found[role] is not None:
        break
  return found


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model: xlps's own (special ids as in the module docstring) or one
  loaded from a file, with the special ids its pieces name."""

  name = "sentencepiece"

  def __init__(self, model_proto: bytes, special_tokens: Mapping[str, str] | None = None,
               source: str = "", file_name: str = "tokenizer.model",
               extra_files: Mapping[str, bytes] | None = None):
    import sentencepiece as spm  # optional dependency: the `sentencepiece` extra
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = int(self._sp.get_piece_size())
    self.source = source
    sp = self._sp
    to_id = lambda piece: (sp.piece_to_id(piece)  # noqa: E731 (unknown pieces give <unk>)
                           if sp.id_to_piece(sp.piece_to_id(piece)) == piece else None)
    _set_ids(self, _resolve(source, to_id, special_tokens))
    self.special_ids = tuple(i for i in range(self.vocab_size)
                             if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))
    self.files = {file_name: bytes(model_proto), **(extra_files or {}),
                  _SPECIAL_TOKENS_MAP: _special_tokens_json(self, sp.id_to_piece, special_tokens)}

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids (int32) of ``text``; bytes must be UTF-8 (callers check and name the file)."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids: Iterable[int]) -> bytes:
    """UTF-8 bytes of the regular ids in ``ids`` (specials and padding are dropped)."""
    drop = {self.pad_id, self.bos_id, self.eos_id, self.mask_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in drop]).encode("utf-8")


class HFTokenizer(Tokenizer):
  """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library (no specials are
  added by ``encode``; the pipelines add BOS / EOS themselves)."""

  name = "tokenizers"

  def __init__(self, tokenizer_json: bytes, special_tokens: Mapping[str, str] | None = None,
               source: str = "", extra_files: Mapping[str, bytes] | None = None):
    try:
      import tokenizers
    except ImportError as e:
      raise ConfigError(f"tokenizer {source or 'tokenizer.json'} needs the `tokenizers` "
                        "package: pip install tokenizers (or the xlps 'interop' extra)") from e
    self._tok = tokenizers.Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.source = source
    _set_ids(self, _resolve(source, self._tok.token_to_id, special_tokens))
    self.special_ids = tuple(sorted(i for i, t in self._tok.get_added_tokens_decoder().items()
                                    if t.special))
    self.files = {"tokenizer.json": bytes(tokenizer_json), **(extra_files or {}),
                  _SPECIAL_TOKENS_MAP: _special_tokens_json(self, self._tok.id_to_token,
                                                            special_tokens)}

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids (int32) of ``text``; bytes must be UTF-8."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids: Iterable[int]) -> bytes:
    """UTF-8 bytes of ``ids`` without the special tokens."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True).encode("utf-8")


def _set_ids(tok: Tokenizer, found: Mapping[str, int | None]) -> None:
  """Sets the special ids; ConfigError naming the tokenizer when PAD, BOS or EOS is missing."""
  missing = [role for role in ("pad", "bos", "eos") if found[role] is None]
  if missing:
    looked = "; ".join(f"{role}: {' / '.join(_ROLES[role][1])} or special_tokens_map "
                       f"{' / '.join(_ROLES[role][0])}" for role in missing)
    raise ConfigError(f"tokenizer {tok.source} has no {', '.join(missing)} token (looked for "
                      f"{looked}); xlps needs PAD, BOS and EOS ids")
  tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id = (found[r] for r in _ROLES)


def _special_tokens_json(tok: Tokenizer, to_token: Callable[[int], str],
                         special_tokens: Mapping[str, str] | None) -> bytes:
  """``special_tokens_map.json``: the snapshot's own, else one naming the resolved tokens."""
  if special_tokens:
    values = dict(special_tokens)
  else:
    values = {f"{role}_token": to_token(i) for role, i in
              (("pad", tok.pad_id), ("bos", tok.bos_id), ("eos", tok.eos_id),
               ("mask", tok.mask_id)) if i is not None}
  return (json.dumps(values, indent=2, sort_keys=True) + "\n").encode()


def _read_special_tokens(directory) -> dict[str, str]:
  """Token strings of a snapshot's special_tokens_map.json and tokenizer_config.json."""
  tokens: dict[str, str] = {}
  for name in ("tokenizer_config.json", _SPECIAL_TOKENS_MAP):  # the map wins
    path = directory / name
    if not path.exists():
      continue
    try:
      values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path} is not valid JSON ({e})") from None
    for key, value in values.items():
      if key.endswith("_token") and isinstance(value, (str, dict)):
        token = value.get("content") if isinstance(value, dict) else value
        if token:
          tokens[key] = token
  return tokens


def load(path: str | os.PathLike, field: str = "data.tokenizer_path") -> Tokenizer:
  """The tokenizer at ``path``: a SentencePiece ``.model``, a ``tokenizer.json``, or a
  directory holding one of them (an HF snapshot, or a directory ``Tokenizer.save`` wrote).

  Bad paths raise a one-line ConfigError naming ``field``, the value and what is valid.
  """
  from etils import epath
  text = os.fspath(path)
  where = epath.Path(text)
  if not text or not where.exists():
    raise ConfigError(f"{field}={text!r} does not exist; valid: {VALID_FILES}")
  special_tokens, extra = None, {}
  if where.is_dir():
    special_tokens = _read_special_tokens(where) or None
    extra = {n: (where / n).read_bytes() for n in _SNAPSHOT_EXTRAS if (where / n).exists()}
    models = sorted(p for p in where.glob("*.model") if p.is_file())
    if (where / "tokenizer.json").exists():
      file = where / "tokenizer.json"
    elif len(models) == 1:
      file = models[0]
    else:
      found = ", ".join(sorted(p.name for p in where.iterdir())) or "nothing"
      raise ConfigError(f"{field}={text!r} is a directory without tokenizer.json or exactly one "
                        f"SentencePiece .model (it holds {found}); valid: {VALID_FILES} (save "
                        "a fast HF tokenizer with save_pretrained to get tokenizer.json)")
  else:
    file = where
  source = os.fspath(file)
  if file.name.endswith(".json"):
    return HFTokenizer(file.read_bytes(), special_tokens, source, extra)
  if file.name.endswith(".model"):
    require_sentencepiece(field)
    try:
      return SentencePieceTokenizer(file.read_bytes(), special_tokens, source, file.name, extra)
    except RuntimeError as e:  # not a ModelProto
      raise ConfigError(f"{field}={text!r} is not a SentencePiece model ({e}); valid: "
                        f"{VALID_FILES}") from None
  raise ConfigError(f"{field}={text!r} is neither a .model nor a .json file; valid: "
                    f"{VALID_FILES}")


def require_sentencepiece(field: str = "data.tokenizer='sentencepiece'") -> None:
  """Raises a ConfigError that says how to install the optional package."""
  try:
    import sentencepiece  # noqa: F401
  except ImportError as e:
    raise ConfigError(f"{field} needs the `sentencepiece` package: pip install sentencepiece "
                      "(or the xlps 'sentencepiece' extra)") from e


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
