"""Command-line config input for ``launch/``: ``--config`` files and ``--config.KEY=VALUE``
overrides checked against the schema, and their failures as one line (exit status 2)
instead of the flag library's tracebacks."""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

import ml_collections

from xlps.config.checks import ConfigError, then_valid, unknown_key
from xlps.config.experiment import base_config

if TYPE_CHECKING:
  from absl import flags as absl_flags


def check_override(key: str, value: str) -> None:
  """A ``--config.KEY=VALUE`` command-line override against the schema (``base_config()``):
  ConfigError for a key no section has (with a suggestion) or a value that cannot be the
  key's type. ``launch/`` calls it when the flag library rejects an override."""
  node, field = base_config(), ""
  parts = key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"--config.{key}: {field}={node!r} has no keys; override {field} itself")
    if part not in node:
      known = tuple(node)
      if not field:
        raise ConfigError(f"{part} is not a config section{then_valid(part, known)}valid: "
                          f"{', '.join(known)}")
      raise unknown_key(field, part, known, "sharing" if ".sharing" in field else field)
    kind = node.get_type(part) if i == len(parts) - 1 else None
    node, field = node[part], f"{field}.{part}" if field else part
  if isinstance(node, ml_collections.ConfigDict):
    return  # a whole section given as a dict literal: validate() checks its keys
  try:
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError
    elif kind in (int, float):
      kind(value)
  except (TypeError, ValueError):
    what = {bool: "a bool (true / false)", int: "an integer", float: "a number"}[kind]
    raise ConfigError(f"{field}={value!r} (from --config.{key}) is not {what}; valid: {what}, "
                      f"e.g. the default {node!r}") from None


def _config_spec(argv: Sequence[str]) -> str | None:
  """The value of ``--config`` in ``argv`` (``path`` or ``path:arg``), if given."""
  for i, arg in enumerate(argv):
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
  return None


def _raised_in(path: str, error: BaseException) -> tuple[BaseException, int] | None:
  """The innermost exception in ``error``'s chain raised from the file ``path``, and its line."""
  target, found, seen = os.path.realpath(path), None, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, SyntaxError) and error.filename and \
        os.path.realpath(error.filename) == target:
      found = (error, error.lineno or 0)
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
             if os.path.realpath(f.filename) == target]
    if lines:
      found = (error, lines[-1])
    error = error.__cause__ or error.__context__
  return found


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else ""


def parse_config_flags(argv: list[str], config_flag: absl_flags.FlagHolder) -> list[str]:
  """absl's flag parsing for a ``launch`` script with ``config_flag`` (its
  ``DEFINE_config_file``), except that bad config input (a missing config file, a
  ``get_config`` that raises, an unknown or mistyped ``--config.KEY``) is one line on stderr
  and exit status 2."""
  from absl import flags
  try:
    rest = flags.FLAGS(argv)
    config_flag.value.get("seed")  # config_flags defers a file's load error to the first access
    return rest
  except Exception as e:  # flags.Error, or whatever the config file raised
    print(f"error: {config_flag_error(argv, e)}", file=sys.stderr)
    sys.exit(2)


def config_flag_error(argv: Sequence[str], error: BaseException) -> str:
  """One line for a failure to parse ``--config`` and its ``--config.KEY=VALUE`` overrides.

  ml_collections defers a missing config file to the config's first use, wraps what
  ``get_config`` raises in the flag library's errors (with a traceback in the message), and
  reports an unknown override as a KeyError; this names the file, the key and what is valid.
  """
  spec = _config_spec(argv)
  if spec:
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
      return (f"--config={spec}: the config file {path!r} does not exist (relative to "
              f"{os.getcwd()}); valid: a Python file with get_config(), e.g. configs/default.py "
              "or configs/default.py:runlocal")
    raised = _raised_in(path, error)
    if raised is not None:
      exc, line = raised
      if isinstance(exc, ConfigError):
        return f"--config={spec}: {_first_line(exc)}"
      return f"--config={spec}: {path}:{line} raised {type(exc).__name__}: {_first_line(exc)}"
  for arg in argv:
    match = re.match(r"--?config\.([^=]+)=(.*)$", arg, re.S)
    if match:
      try:
        check_override(*match.groups())
      except ConfigError as e:
        return str(e)
  return _first_line(error) or type(error).__name__
