"""Bad input: ONE table, each row one kind of bad input and the one clear error it gets.

Every message names the field (or file / flag), the value and what would be valid, and is
raised before anything compiles: config rows through ``config.validate``, data rows through
``data.build``, workdir rows through ``train.workdir_path`` / ``_check_workdir``, mesh rows
through ``validate`` / ``sharded_init`` (shapes only), command-line rows through
``python -m launch.train`` (one ``error:`` line on stderr, exit status 2, no traceback).
``NEW`` lists the rows that had no clear error before (a traceback or a silently accepted
value), ``REWORDED`` those whose error now also says what is valid; the others pin what
was already handled.
"""

import dataclasses
import errno
import os
import pathlib
import re
import resource
import shlex
import shutil
import subprocess
from collections.abc import Callable

import jax
import ml_collections
import pytest
import tensorflow_datasets as tfds

from xlps import config as config_lib
from xlps import data, models, partitioning, train
from xlps.data import sources

from helpers import launch_train, run_command

ConfigError = config_lib.ConfigError


class XlpsBadInputTiny(tfds.core.GeneratorBasedBuilder):
  """A real TFDS dataset prepared as array_record (48 records, feature ``body``)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({"body": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(40), "validation": self._generate_examples(8)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"body": f"document {i:03d} " + "alpha beta gamma " * (i % 5 + 1)}


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_tfds")
  builder = XlpsBadInputTiny(data_dir=str(root), file_format="array_record")
  builder.download_and_prepare(file_format="array_record",
                               download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return root


@dataclasses.dataclass
class Ctx:
  tmp_path: pathlib.Path
  tiny_tfds: pathlib.Path
  monkeypatch: pytest.MonkeyPatch


@dataclasses.dataclass
class Cli:
  """A finished ``launch.train``; ``compiled`` allows the train step to have compiled (the
  disk-full row). No row may print a traceback, Orbax's background threads' included."""

  proc: subprocess.CompletedProcess
  compiled: bool = False


# --------------------------------------------------------------------------- builders

def config_with(ctx: Ctx, *pairs) -> ml_collections.ConfigDict:
  """``base_config()`` with each ``(dotted.path, value)`` set through a plain dict, as a
  config file building its own dicts would (ConfigDict's assignment checks would stop some
  of these earlier); a callable value gets ``ctx``."""
  d = config_lib.base_config().to_dict()
  d["data"]["data_dir"] = str(ctx.tmp_path / "tfds")
  for path, value in pairs:
    node = d
    *head, last = path.split(".")
    for key in head:
      node = node[key]
    node[last] = value(ctx) if callable(value) else value
  return ml_collections.ConfigDict(d)


def validated(*pairs) -> Callable[[Ctx], object]:
  return lambda ctx: config_lib.validate(config_with(ctx, *pairs), num_devices=8)


def built(*pairs) -> Callable[[Ctx], object]:
  return lambda ctx: data.build(config_with(ctx, *pairs))


def sharded_init(*pairs) -> Callable[[Ctx], object]:
  def run(ctx):
    config = config_with(ctx, *pairs)
    spec = config_lib.validate(config, num_devices=8)
    return train.sharded_init(spec, train.make_optimizer(config.train), 0,
                              partitioning.make_mesh(config.mesh),
                              partitioning.rules_of(config.mesh))
  return run


def files(ctx: Ctx, contents: dict) -> str:
  """Writes ``{name: bytes | None (a directory)}`` under ``ctx.tmp_path / 'corpus'``."""
  root = ctx.tmp_path / "corpus"
  root.mkdir(exist_ok=True)
  for name, content in contents.items():
    if content is None:
      (root / name).mkdir()
    else:
      (root / name).write_bytes(content)
  return str(root)


def text_files(contents: dict, pattern: str = "*.txt", **data) -> Callable[[Ctx], object]:
  def run(ctx):
    glob = os.path.join(files(ctx, contents), pattern)
    return built(("data.name", "text_files"), ("data.glob", glob),
                 *((f"data.{k}", v) for k, v in data.items()))(ctx)
  return run


def unreadable_file(ctx: Ctx):
  root = files(ctx, {"good.txt": b"some text\n" * 10, "secret.txt": b"hidden text\n" * 10})
  secret = os.path.join(root, "secret.txt")
  if os.geteuid() != 0:
    os.chmod(secret, 0)
  else:  # root reads mode-000 files: refuse this one path as a real EACCES would
    real_open = open

    def refusing_open(path, *args, **kwargs):
      if os.fspath(path) == secret:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), secret)
      return real_open(path, *args, **kwargs)
    ctx.monkeypatch.setattr(sources, "open", refusing_open, raising=False)
  return built(("data.name", "text_files"), ("data.glob", os.path.join(root, "*.txt")))(ctx)


def unwritable_data_dir(ctx: Ctx) -> str:
  """A data_dir that cannot be created: under a mode-555 folder, or (root writes there
  anyway) under /sys, which refuses everyone."""
  if os.geteuid() == 0:
    return "/sys/xlps_bad_input_tfds"
  folder = ctx.tmp_path / "read_only"
  folder.mkdir()
  folder.chmod(0o555)
  return str(folder / "tfds")


def tiny(*pairs) -> Callable[[Ctx], object]:
  return built(("data.name", "tfds"), ("data.tfds_name", "xlps_bad_input_tiny"),
               ("data.data_dir", lambda ctx: str(ctx.tiny_tfds)), ("data.text_key", "body"),
               *pairs)


def corrupted_tiny(ctx: Ctx):
  """A copy of the prepared tiny dataset with 8 bytes flipped inside one record's chunk."""
  copy = ctx.tmp_path / "corrupt_tfds"
  shutil.copytree(ctx.tiny_tfds, copy)
  path = next(copy.glob("xlps_bad_input_tiny/1.0.0/*-train.array_record-*"))
  raw = bytearray(path.read_bytes())
  at = raw.find(b"document 020")
  at = at if at >= 0 else 400
  raw[at:at + 8] = bytes(b ^ 0xFF for b in raw[at:at + 8])
  path.write_bytes(bytes(raw))
  return tiny(("data.data_dir", str(copy)))(ctx)


def workdir(path: Callable[[Ctx], str]) -> Callable[[Ctx], object]:
  return lambda ctx: train._check_workdir(train.workdir_path(path(ctx)))


def blocker(ctx: Ctx) -> pathlib.Path:
  (ctx.tmp_path / "a_file").write_text("not a folder")
  return ctx.tmp_path / "a_file"


def file_size_limit(ctx: Ctx):
  """RLIMIT_FSIZE of 1 byte (``ulimit -f``) while the workdir is probed; Python ignores
  SIGXFSZ, so the write fails with EFBIG as it would on a full disk with ENOSPC."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))
  try:
    train._check_workdir(train.workdir_path(ctx.tmp_path / "wd"))
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def cli(*flags: str, config: str = "configs/default.py:runlocal",
        file: tuple[str, str] | None = None) -> Callable[[Ctx], Cli]:
  def run(ctx):
    spec = config
    if file:
      (ctx.tmp_path / file[0]).write_text(file[1])
      spec = str(ctx.tmp_path / file[0])
    return Cli(run_command(launch_train(ctx.tmp_path / "wd", *flags, config=spec), timeout=120))
  return run


def disk_full(ctx: Ctx) -> Cli:
  """Step 1 is committed; the run continued under ``ulimit -f 16`` (KiB) cannot write the
  step-2 checkpoint (its array files, ``_METADATA`` and ``_sharding`` are 20-180 KB; how
  TensorStore batches arrays into files varies, so a limit near the largest passed at times):
  one error line naming the workdir, last on stderr, and checkpoint 1 and its metrics are
  still there to resume from."""
  root = files(ctx, {f"doc{i}.txt": (f"document {i} " * 300).encode() for i in range(6)})
  wd = ctx.tmp_path / "wd"
  flags = ["--config.data.name=text_files", f"--config.data.glob={root}/*.txt",
           "--config.data.seq_len=32", "--config.model.max_len=32", "--config.train.batch_size=8",
           "--config.data.eval_batches=1", "--config.train.log_every_steps=1",
           "--config.train.checkpoint_every_steps=1", "--config.train.async_checkpoints=false",
           "--config.train.warmup_steps=0"]
  first = run_command(launch_train(wd, *flags, "--config.train.num_steps=1"), timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  command = shlex.join(launch_train(wd, *flags, "--config.train.num_steps=2"))
  proc = run_command(["bash", "-c", f"ulimit -f 16; exec {command}"], timeout=300)
  committed = sorted(p.name for p in (wd / "checkpoints").iterdir())
  assert "1" in committed and "2" not in committed, committed
  assert (wd / "checkpoints" / "1" / "state").is_dir()
  assert '"step": 1' in (wd / "metrics.jsonl").read_text()
  assert proc.stderr.rstrip().splitlines()[-1].startswith("error: workdir="), proc.stderr[-3000:]
  return Cli(proc, compiled=True)


# ------------------------------------------------------------------------------ table

ROWS = [
    # -- config: keys (a typo gets the closest key)
    ("train_key_typo", validated(("train.learnig_rate", 1e-3)),
     r"^train\.learnig_rate is not a train key; did you mean learning_rate\? valid keys: .*"
     r"learning_rate"),
    ("model_key_typo", validated(("model.num_head", 4)),
     r"^model\.num_head is not a model key; did you mean num_heads\? valid keys: .*num_heads"),
    ("data_key_typo", validated(("data.seqlen", 64)),
     r"^data\.seqlen is not a data key; did you mean seq_len\? valid keys: .*seq_len"),
    ("mesh_key_typo", validated(("mesh.tensr", 2)),
     r"^mesh\.tensr is not a mesh key; did you mean tensor\? valid keys: data, fsdp, rules, "
     r"tensor"),
    ("section_typo", validated(("modle", {})),
     r"^modle is not a config section; did you mean model\? valid: seed, model, data, train"),
    ("sharing_key_typo", validated(("model.sharing.num_uniqe", 2)),
     r"^model\.sharing\.num_uniqe is not a sharing key; did you mean num_unique\? valid keys: "
     r"num_unique, order, table and components attention, mlp"),
    ("sharing_component_key_typo", validated(("model.sharing.mlp.ordr", "cycle")),
     r"^model\.sharing\.mlp\.ordr is not a sharing key; did you mean order\? valid keys: "
     r"num_unique, order, table"),
    ("choice_typo", validated(("model.family", "decoder-lm")),
     r"^model\.family='decoder-lm' is not valid; choose one of: decoder_lm, encoder_mlm, "
     r"encoder_decoder, puzzle; did you mean decoder_lm\?"),
    # -- config: types
    ("str_for_int", validated(("train.num_steps", "100")),
     r"^train\.num_steps='100' must be an integer >= 1"),
    ("bool_for_int", validated(("train.batch_size", True)),
     r"^train\.batch_size=True must be an integer >= 1"),
    ("float_for_int", validated(("model.d_model", 256.0)),
     r"^model\.d_model=256\.0 must be an integer >= 1"),
    ("str_for_float", validated(("model.dropout_rate", "0.1")),
     r"^model\.dropout_rate='0\.1' must be a number >= 0 and < 1"),
    ("str_for_float_unparsable", validated(("model.norm_eps", "small")),
     r"^model\.norm_eps='small' must be a number >= 0"),
    ("str_for_bool", validated(("model.use_bias", "yes")),
     r"^model\.use_bias='yes' must be a bool; valid: True, False"),
    ("int_for_bool", validated(("train.async_checkpoints", 1)),
     r"^train\.async_checkpoints=1 must be a bool; valid: True, False"),
    ("str_for_learning_rate", validated(("train.learning_rate", "1e-3")),
     r"^train\.learning_rate='1e-3' must be a number > 0"),
    ("str_for_mlm_probability", validated(("data.mlm_probability", "high")),
     r"^data\.mlm_probability='high' must be a number in \(0, 1\)"),
    # -- config: ranges
    ("dropout_out_of_range", validated(("model.dropout_rate", 1.5)),
     r"^model\.dropout_rate=1\.5 must be a number >= 0 and < 1"),
    ("b2_out_of_range", validated(("train.b2", 1.0)),
     r"^train\.b2=1\.0 must be a number >= 0 and < 1"),
    ("seed_negative", validated(("seed", -1)), r"^seed=-1 must be an integer >= 0"),
    ("seq_len_too_small", validated(("data.seq_len", 1)),
     r"^data\.seq_len=1 must be an integer >= 2"),
    ("warmup_not_before_the_end", validated(("train.num_steps", 20), ("train.warmup_steps", 30)),
     r"^train\.warmup_steps=30 >= train\.num_steps=20: the run ends inside its warmup and the "
     r"learning rate never reaches learning_rate=0\.001; valid: warmup_steps < num_steps, or "
     r"ask for it explicitly by setting train\.decay_steps"),
    # -- config: cross-field constraints
    ("seq_len_exceeds_max_len", validated(("data.seq_len", 1024)),
     r"^data\.seq_len=1024 exceeds model\.max_len=512: .*set model\.max_len >= 1024 or "
     r"data\.seq_len <= 512"),
    ("num_heads_not_dividing", validated(("model.num_heads", 5)),
     r"^model\.num_heads=5 does not divide model\.d_model=256; valid num_heads: \[1, 2, 4, 8,"),
    ("num_kv_heads_not_dividing", validated(("model.num_kv_heads", 3)),
     r"^model\.num_kv_heads=3 does not divide model\.num_heads=4; valid num_kv_heads: "
     r"\[1, 2, 4\]"),
    ("embed_dim_exceeds_d_model", validated(("model.embed_dim", 512)),
     r"^model\.embed_dim=512 exceeds model\.d_model=256; .*embed_dim <= d_model"),
    ("vocab_below_tokenizer", validated(("model.vocab_size", 100)),
     r"^model\.vocab_size=100 is smaller than the byte tokenizer's vocabulary \(260\); set "
     r"model\.vocab_size >= 260"),
    ("batch_not_divisible_by_mesh", validated(("train.batch_size", 12)),
     r"^train\.batch_size=12 must be a multiple of the mesh's data x fsdp = 8 x 1 = 8"),
    ("family_vs_dataset", validated(("model.family", "encoder_decoder")),
     r"^model\.family='encoder_decoder' does not fit data\.name='stdlib'; valid families: "
     r"decoder_lm, encoder_mlm"),
    ("tie_encoder_decoder_needs_family", validated(("model.tie_encoder_decoder", True)),
     r"^model\.tie_encoder_decoder=True needs model\.family='encoder_decoder' \(family is "
     r"'decoder_lm'\)"),
    ("algorithmic_seq_len_too_small", validated(
        ("data.name", "algorithmic"), ("data.task", "addition"), ("data.seq_len", 40),
        ("model.family", "encoder_decoder")),
     r"^data\.seq_len=40 is too small for task 'addition' .*set seq_len >= 81"),
    ("sharing_table_missing", validated(("model.sharing.order", "table")),
     r"^model\.sharing\.order='table' needs model\.sharing\.table, a list of 6 slot indices"),
    ("sharing_table_length", validated(("model.sharing.order", "table"),
                                       ("model.sharing.table", "0 1 2")),
     r"^model\.sharing\.table has 3 entries \(0, 1, 2\); it needs exactly one per applied "
     r"layer, num_layers=6"),
    ("sharing_table_out_of_range", validated(
        ("model.sharing.order", "table"), ("model.sharing.num_unique", 2),
        ("model.sharing.table", "0 1 1 1 1 5")),
     r"^model\.sharing\.table entries \[5\] are out of range; with model\.sharing\.num_unique=2 "
     r"valid slots are 0\.\.1"),
    ("sharing_table_unread", validated(("model.sharing.table", "0 0 1 1 2 2")),
     r"^model\.sharing\.table='0 0 1 1 2 2' is only read when model\.sharing\.order='table' "
     r"\(order is 'cycle'\); clear it or set order='table'"),
    ("sharing_num_unique_exceeds_depth", validated(("model.sharing.num_unique", 7)),
     r"^model\.sharing\.num_unique=7 must be an integer in \[1, num_layers=6\]"),
    ("sharing_order_unknown", validated(("model.sharing.order", "cylce")),
     r"^model\.sharing\.order='cylce' is not a sharing order; valid: sequence, cycle"),
    # -- mesh
    ("mesh_product_vs_devices", validated(("mesh.data", 3)),
     r"^mesh data=3 x fsdp=1 x tensor=1 needs 3 devices but 8 are available; make the product "
     r"equal the device count or set one axis to -1"),
    ("mesh_more_than_devices", validated(("mesh.data", 4), ("mesh.tensor", 4)),
     r"^mesh data=4 x fsdp=1 x tensor=4 needs 16 devices but 8 are available"),
    ("mesh_two_fill_axes", validated(("mesh.fsdp", -1)),
     r"^mesh axes \['data', 'fsdp'\] are all -1; at most one axis may fill the devices"),
    ("mesh_fixed_axes_not_dividing", validated(("mesh.fsdp", 3)),
     r"^mesh \{'data': -1, 'fsdp': 3, 'tensor': 1\}: the fixed axes \(3 devices\) do not divide "
     r"the 8 devices available"),
    ("mesh_axis_zero", validated(("mesh.tensor", 0)),
     r"^mesh\.tensor=0 must be a positive integer or -1 \(fill\)"),
    ("mesh_axis_str", validated(("mesh.data", "2")),
     r"^mesh\.data='2' must be a positive integer or -1 \(fill\)"),
    ("mesh_rules_unknown_mesh_axis", validated(("mesh.rules", (("mlp", "tensr"),))),
     r"^mesh\.rules entry \('mlp', 'tensr'\) names the mesh axis 'tensr', which the mesh does "
     r"not have; did you mean tensor\? valid mesh axes: data, fsdp, tensor"),
    ("mesh_rules_unknown_mesh_axis_in_tuple", validated(("mesh.rules", (("embed", ("fsdp",
                                                                                   "model")),))),
     r"^mesh\.rules entry \('embed', \('fsdp', 'model'\)\) names the mesh axis 'model', .*"
     r"valid mesh axes: data, fsdp, tensor"),
    ("mesh_rules_unknown_logical_axis", validated(("mesh.rules", (("mpl", "tensor"),))),
     r"^mesh\.rules entry \('mpl', 'tensor'\) names the logical axis 'mpl', .*did you mean "
     r"mlp\? valid logical axes: batch, length, embed, mlp"),
    ("mesh_rules_not_pairs", validated(("mesh.rules", ("mlp",))),
     r"^mesh\.rules entry 'mlp' is not a \(logical axis, mesh axes\) pair; valid: pairs such "
     r"as \(\('mlp', 'fsdp'\)"),
    ("mesh_rules_a_string", validated(("mesh.rules", "mlp=tensor")),
     r"^mesh\.rules='mlp=tensor' must be a sequence of \(logical axis, mesh axes\) pairs; "
     r"valid: e\.g\. "),
    ("mesh_tensor_does_not_divide_heads", sharded_init(("mesh.data", 1), ("mesh.tensor", 8)),
     r"has shape .*sharded over mesh axes \('tensor',\) of total size 8, which does not "
     r"divide it; change the mesh \(e\.g\. mesh\.tensor\)"),
    # -- data
    ("data_name_typo", built(("data.name", "text_file")),
     r"^data\.name='text_file' is not valid; choose one of: stdlib, algorithmic, text_files, "
     r"tfds, sudoku, maze, puzzle_files; did you mean text_files\?"),
    ("data_dir_is_a_file", built(("data.data_dir", lambda ctx: str(blocker(ctx) / "tfds"))),
     r"^data\.data_dir='.*a_file/tfds' cannot be used \('.*a_file' is a file, not a "
     r"directory\); valid: a directory"),
    ("data_dir_unwritable", built(("data.data_dir", unwritable_data_dir)),
     r"^data\.data_dir='.*tfds' cannot be written \(.*\) and xlps_stdlib is not prepared "
     r"there; valid: a writable directory for prepared datasets"),
    ("text_files_no_match", built(("data.name", "text_files"),
                                  ("data.glob", "/nonexistent/**/*.txt")),
     r"^data\.glob='/nonexistent/\*\*/\*\.txt' matched no files; give a glob of your text "
     r"files, e\.g\. "),
    ("text_files_glob_unset", built(("data.name", "text_files")),
     r"^data\.glob='' matched no files; give a glob of your text files"),
    ("text_files_directory_not_file", text_files({"corpus.txt": None}, "corpus.txt"),
     r"^data\.glob='.*corpus\.txt' matched 1 path\(s\) but no files \('.*corpus\.txt' is a "
     r"directory\); valid: a glob of files, e\.g\. '.*corpus\.txt/\*\*/\*\.txt'"),
    ("text_files_empty_file", text_files({"a.txt": b"text\n" * 9, "empty.txt": b" \n"}),
     r"^data\.glob='.*\*\.txt': file '.*empty\.txt' is empty; remove it or narrow the glob"),
    ("text_files_unreadable_file", unreadable_file,
     r"^data\.glob='.*\*\.txt': file '.*secret\.txt' cannot be read \(Permission denied\); fix "
     r"its permissions or narrow the glob"),
    ("text_files_not_utf8_sentencepiece", text_files({"latin.txt": b"caf\xe9 au lait\n" * 9},
                                                     tokenizer="sentencepiece"),
     r"^data\.glob='.*': file '.*latin\.txt' is not UTF-8 \(.*\); data\.tokenizer='sentencepiece' "
     r"needs UTF-8 text \(the 'byte' tokenizer accepts any bytes\)"),
    ("text_files_single_file_too_small", text_files({"one.txt": b"x"}),
     r"^data\.glob='.*': the single file '.*one\.txt' is too small to split into train and "
     r"validation"),
    ("tfds_name_empty", built(("data.name", "tfds")),
     r"^data\.tfds_name='' is empty; with data\.name='tfds' name a prepared TFDS dataset, e\.g\."),
    ("tfds_name_unknown", built(("data.name", "tfds"), ("data.tfds_name", "no_such_dataset")),
     r"^data\.tfds_name='no_such_dataset' split 'train' could not be read from data_dir .*"
     r"Prepare it there as array_record first"),
    ("tfds_not_prepared", built(("data.name", "tfds"), ("data.tfds_name", "xlps_bad_input_tiny")),
     r"^data\.tfds_name='xlps_bad_input_tiny' split 'train' could not be read from data_dir .*"
     r"Prepare it there as array_record first"),
    ("tfds_split_unknown", tiny(("data.eval_split", "test")),
     r"^data\.tfds_name='xlps_bad_input_tiny' split 'test' could not be read .*check "
     r"data\.train_split / data\.eval_split"),
    ("tfds_text_key_unknown", tiny(("data.text_key", "text")),
     r"^data\.text_key='text' is not a feature of 'xlps_bad_input_tiny'; its features: body"),
    ("tfds_corrupted_file", corrupted_tiny,
     r"^data\.tfds_name='xlps_bad_input_tiny' split 'train': record \d+ in file "
     r"'.*corrupt_tfds/xlps_bad_input_tiny/1\.0\.0/xlps_bad_input_tiny-train\.array_record-00000"
     r"-of-00001' cannot be read, the file is corrupted or truncated \(RuntimeError: Corrupted "
     r"Riegeli.*\); prepare 'xlps_bad_input_tiny' again"),
    # -- environment
    ("workdir_empty", workdir(lambda ctx: ""),
     r"^workdir='' is empty; valid: a directory to write checkpoints and metrics to"),
    ("workdir_unsupported_scheme", workdir(lambda ctx: "hdfs://x/run"),
     r"^workdir='hdfs://x/run': the scheme 'hdfs://' is not supported; use a local path or one "
     r"of gs://"),
    ("workdir_is_a_file", workdir(lambda ctx: str(blocker(ctx))),
     r"^workdir='.*a_file' cannot be written \(it is a file, not a directory\); valid: a "
     r"--workdir that is a directory"),
    ("workdir_under_a_file", workdir(lambda ctx: str(blocker(ctx) / "sub" / "wd")),
     r"^workdir='.*a_file/sub/wd' cannot be written \('.*a_file' is a file, not a directory\); "
     r"valid: a --workdir that is a directory"),
    ("workdir_file_size_limit", file_size_limit,
     r"^workdir='.*wd' cannot be written \(disk full / file size limit: File too large\); "
     r"valid: a --workdir .* with free space"),
    ("disk_full_mid_run", disk_full,
     r"^error: workdir='.*wd': disk full / file size limit \(File too large\) while writing; the "
     r"checkpoints committed before are kept \(latest: step 1\); free space \(or raise `ulimit "
     r"-f`\) and run the same command to resume$"),
    # -- command line (python -m launch.train)
    ("cli_config_file_missing", cli(config="configs/no_such_config.py"),
     r"^error: --config=configs/no_such_config\.py: the config file "
     r"'configs/no_such_config\.py' does not exist \(relative to .*\); valid: a Python file "
     r"with get_config\(\), e\.g\. configs/default\.py"),
    ("cli_config_file_raises", cli(file=("bad_config.py", "def get_config(arg=None):\n"
                                                          "  raise RuntimeError('no such run')\n")),
     r"^error: --config=.*bad_config\.py: .*bad_config\.py:2 raised RuntimeError: no such run$"),
    ("cli_config_arg_unknown", cli(config="configs/default.py:bogus"),
     r"^error: --config=configs/default\.py:bogus: configs/default\.py:\d+ raised ValueError: "
     r"configs/default\.py variant 'bogus' is unknown; valid: tied, unshared, cycle"),
    ("cli_override_key_typo", cli("--config.train.learnig_rate=0.1"),
     r"^error: train\.learnig_rate is not a train key; did you mean learning_rate\? valid "
     r"keys: .*learning_rate"),
    ("cli_override_not_an_int", cli("--config.train.num_steps=2.5"),
     r"^error: train\.num_steps='2\.5' \(from --config\.train\.num_steps\) is not an integer; "
     r"valid: an integer, e\.g\. the default 1000$"),
    # Settings accepted and then ignored or meaningless (issue 23).
    ("loop_keys_without_a_core", validated(("model.loop.inject", "add")),
     r"^model\.loop\.inject='add' is only read by a looped stack, and model\.loop\.core=0 "
     r"\(no loop\): set model\.loop\.core > 0, or leave model\.loop\.inject at the default$"),
    ("loop_exit_threshold_negative_without_a_core",
     validated(("model.loop.exit_threshold", -0.5)),
     r"^model\.loop\.exit_threshold=-0\.5 must be a number >= 0$"),
    ("act_threshold_zero", validated(("model.act.enabled", True), ("model.act.threshold", 0.0)),
     r"^model\.act\.threshold=0\.0 must be a number > 0 and <= 1$"),
    ("lora_rank_above_full_rank", validated(("model.lora.rank", 1000)),
     r"^model\.lora\.rank=1000 exceeds the full rank of the adapted matrices \(256: the "
     r"smallest of model\.lora\.targets\); valid: 1\.\.256$"),
    ("lora_target_the_model_lacks",
     validated(("model.lora.rank", 4), ("model.lora.targets", "wi_up")),
     r"^model\.lora\.targets='wi_up' names wi_up, which this model does not have "
     r"\(model\.activation='gelu'\); valid: query, key, value, out, wi, wo$"),
    ("cudnn_without_an_nvidia_gpu",
     cli("--config.model.attention_impl=cudnn", "--config.model.dtype=bfloat16"),
     r"^error: model\.attention_impl='cudnn' needs an NVIDIA GPU \(cuDNN flash attention\); "
     r"this machine runs on cpu \(cpu\); valid here: auto, xla, einsum$"),
]

# Rows that had no clear error before this table: a traceback, a silently accepted value,
# or (command line) a traceback / "FATAL Flags parsing error" with exit status 1.
NEW = {
    "mesh_key_typo", "str_for_float", "str_for_float_unparsable", "str_for_bool",
    "int_for_bool", "str_for_mlm_probability", "mesh_rules_unknown_mesh_axis",
    "mesh_rules_unknown_mesh_axis_in_tuple", "mesh_rules_unknown_logical_axis",
    "mesh_rules_not_pairs", "mesh_rules_a_string", "data_dir_is_a_file",
    "text_files_unreadable_file", "tfds_corrupted_file", "workdir_empty", "disk_full_mid_run",
    "cli_config_file_missing", "cli_config_file_raises", "cli_config_arg_unknown",
    "cli_override_key_typo", "cli_override_not_an_int", "warmup_not_before_the_end",
    "data_dir_unwritable",
    "loop_keys_without_a_core", "loop_exit_threshold_negative_without_a_core",
    "act_threshold_zero", "lora_rank_above_full_rank", "lora_target_the_model_lacks",
    "cudnn_without_an_nvidia_gpu",
}
# Rows that were a ConfigError already and now also say what is valid (a did-you-mean, the
# kind of value, or why the path cannot be used).
REWORDED = {
    "train_key_typo", "model_key_typo", "data_key_typo", "section_typo", "sharing_key_typo",
    "sharing_component_key_typo", "choice_typo", "data_name_typo", "str_for_learning_rate",
    "dropout_out_of_range", "text_files_directory_not_file", "workdir_is_a_file",
    "workdir_under_a_file", "workdir_file_size_limit",
}


def test_table_has_at_least_30_kinds_with_unique_ids():
  ids = [row[0] for row in ROWS]
  assert len(ids) == len(set(ids)) >= 30 and NEW | REWORDED <= set(ids)
  assert not NEW & REWORDED


def test_rules_check_knows_every_logical_axis():
  """config.LOGICAL_AXES (what mesh.rules may name) is partitioning's standard rule set."""
  standard = {logical for logical, _ in partitioning.standard_logical_axis_rules()}
  assert standard == set(config_lib.LOGICAL_AXES)
  config = config_lib.base_config()
  config.model.embed_dim = 64  # the factorized embedding adds the 'factor' axis
  spec = config_lib.validate(config, num_devices=8)
  boxed = jax.eval_shape(lambda: models.init_params(spec, seed=0))
  names = {n for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
           for n in getattr(leaf, "names", ()) if n is not None}
  assert names and names <= set(config_lib.LOGICAL_AXES), names


# disk_full_mid_run trains in a process of its own: slow tier.
@pytest.mark.parametrize("action,pattern", [
    pytest.param(a, p, id=i, marks=pytest.mark.slow if i == "disk_full_mid_run" else ())
    for i, a, p in ROWS])
def test_bad_input(action, pattern, tmp_path, tiny_tfds, monkeypatch):
  ctx = Ctx(tmp_path, tiny_tfds, monkeypatch)
  try:
    result = action(ctx)
  except ConfigError as e:
    message = str(e)
  else:
    assert isinstance(result, Cli), f"no error for this input (got {type(result).__name__})"
    proc = result.proc
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    message = errors[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if not result.compiled:
      assert "compiled" not in proc.stderr, proc.stderr[-3000:]
  assert "\n" not in message
  assert re.search(pattern, message), message
