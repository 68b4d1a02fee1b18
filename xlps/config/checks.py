"""``ConfigError`` and the checks every section uses.

One error type for bad configuration or command-line input, and field checks whose messages
name the field, the value and what would be valid (with a did-you-mean for typos). Every other
module of ``xlps.config`` builds on these; this one imports nothing else of xlps.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import ml_collections


class ConfigError(ValueError):
  """Bad configuration or command-line input. ``launch/`` prints the message and exits 2;
  every other exception keeps its traceback."""


def parse_arg(arg: str | None,
              **defaults: bool | int | float | str) -> ml_collections.ConfigDict:
  """big_vision-style ``get_config`` argument: ``"base"`` or ``"variant=base,runlocal"``.

  A bare word sets the first default key (or a bool default to True); ``key=value`` pairs
  are converted to the default's type. Unknown keys raise ConfigError.
  """
  result = dict(defaults)
  first = next(iter(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      if isinstance(defaults.get(key), bool):
        result[key] = True
        continue
      key, value = first, item
    if key not in defaults:
      raise ConfigError(f"config argument {key!r} is unknown; valid: {', '.join(defaults)}")
    kind = type(defaults[key])
    result[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return ml_collections.ConfigDict(result)


def did_you_mean(value: object, valid: Iterable[object]) -> str:
  """``"; did you mean X?"`` for the closest of ``valid`` to a mistyped ``value`` (else "")."""
  if not isinstance(value, str):
    return ""
  close = difflib.get_close_matches(value, [str(v) for v in valid], n=1)
  return f"; did you mean {close[0]}?" if close else ""


def then_valid(value: object, valid: Iterable[object]) -> str:
  """``"; did you mean X? "`` or ``"; "``: what goes between an error and its valid list."""
  hint = did_you_mean(value, valid)
  return f"{hint} " if hint else "; "


def unknown_key(field: str, key: str, known: Sequence[str], what: str,
                valid: str | None = None) -> ConfigError:
  """The error for ``field.key`` missing from a section's schema (a typo, most often)."""
  valid = ", ".join(known) if valid is None else valid
  return ConfigError(f"{field}.{key} is not a {what} key{then_valid(key, known)}"
                     f"valid keys: {valid}")


def check_keys(section: Iterable[str], field: str, known: Sequence[str], what: str,
               valid: str | None = None) -> None:
  """Raises ``unknown_key`` for the first key of ``section`` that ``known`` lacks."""
  for key in section:
    if key not in known:
      raise unknown_key(field, key, known, what, valid)


def check_choice(field: str, value: object, valid: tuple) -> None:
  if value not in valid:
    raise ConfigError(f"{field}={value!r} is not valid; choose one of: "
                      f"{', '.join(map(str, valid))}{did_you_mean(value, valid)}")


def check_bool(field: str, value: object) -> None:
  if not isinstance(value, bool):
    raise ConfigError(f"{field}={value!r} must be a bool; valid: True, False")


def check_str(field: str, value: object) -> None:
  if not isinstance(value, str):
    raise ConfigError(f"{field}={value!r} must be a string")


def check_number(field: str, value: object, lo: float, hi: float | None = None, *,
                 integer: bool = False, open_lo: bool = False, open_hi: bool = False) -> None:
  """ConfigError naming ``field`` unless ``lo <= value <= hi`` (``lo <`` with ``open_lo``,
  ``< hi`` with ``open_hi``)."""
  kinds = (int,) if integer else (int, float)
  wrong_type = isinstance(value, bool) or not isinstance(value, kinds)
  below = not wrong_type and (value <= lo if open_lo else value < lo)
  above = not wrong_type and hi is not None and (value >= hi if open_hi else value > hi)
  if wrong_type or below or above:
    what = "an integer" if integer else "a number"
    bound = "" if hi is None else f" and {'<' if open_hi else '<='} {hi}"
    raise ConfigError(f"{field}={value!r} must be {what} {'>' if open_lo else '>='} {lo}{bound}")


def check_int(field: str, value: object, minimum: int) -> None:
  check_number(field, value, minimum, integer=True)
