"""Checks of config values before any work starts, each error naming the field.

Each family's `config.py` lists the fields its pipeline reads in a
`validate_config(config)` built from these helpers; `launch.py` calls it before
it writes anything to the workdir. Errors are `ConfigError` (a `ValueError`) or
`FileNotFoundError`, one line each, e.g. "data.size must be (H, W) ..., got 64".
"""
from __future__ import annotations

import numbers
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

from jaxprompt import precision as precision_lib


class ConfigError(ValueError):
  """A config field holds a value the pipeline cannot use."""


class Scoped:
  """A sub-config seen as `prefix.<field>`: the checks run on it name the full field
  (e.g. the default job's `clipreid.data.size`). Reads pass through to the sub-config."""

  def __init__(self, config: Mapping, prefix: str):
    self._config, self._prefix = config, prefix

  def __getattr__(self, name: str) -> Any:
    return getattr(self._config, name)

  def __getitem__(self, key: str) -> Any:
    return self._config[key]

  def __contains__(self, key: str) -> bool:
    return key in self._config

  def get(self, key: str, default: Any = None) -> Any:
    return self._config.get(key, default)


def name(config: Mapping, field: str) -> str:
  """The field's full name (with the prefix of a `Scoped` config)."""
  prefix = config._prefix if isinstance(config, Scoped) else ""  # pylint: disable=protected-access
  return f"{prefix}.{field}" if prefix else field


def value(config: Mapping, field: str) -> Any:
  """`config.a.b` for `field='a.b'`; a missing field is a ConfigError naming it."""
  node = config
  for part in field.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      raise ConfigError(f"the config has no field {name(config, field)!r}") from None
  return node


def _shown(v: Any) -> str:
  # ml_collections turns tuples from the command line into tuples of one; show them plainly.
  if isinstance(v, (tuple, list)) and len(v) == 1:
    return repr(v[0])
  return repr(v)


def _is_int(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def integer(config: Mapping, field: str, *, minimum: Optional[int] = None) -> int:
  v, field = value(config, field), name(config, field)
  if not _is_int(v):
    raise ConfigError(f"{field} must be an integer, got {_shown(v)}")
  if minimum is not None and v < minimum:
    what = "positive" if minimum == 1 else f">= {minimum}"
    raise ConfigError(f"{field} must be {what}, got {v}")
  return int(v)


def positive(config: Mapping, field: str) -> int:
  """A positive integer (epochs, batch sizes, sizes)."""
  return integer(config, field, minimum=1)


def number(config: Mapping, field: str, *, minimum: Optional[float] = None,
           strictly: bool = False) -> float:
  v, field = value(config, field), name(config, field)
  if not isinstance(v, numbers.Real) or isinstance(v, bool):
    raise ConfigError(f"{field} must be a number, got {_shown(v)}")
  if minimum is not None and (v <= minimum if strictly else v < minimum):
    raise ConfigError(f"{field} must be {'>' if strictly else '>='} {minimum}, got {v}")
  return float(v)


def boolean(config: Mapping, field: str) -> bool:
  v, field = value(config, field), name(config, field)
  if not isinstance(v, bool):
    raise ConfigError(f"{field} must be True or False, got {_shown(v)}")
  return v


def one_of(config: Mapping, field: str, choices: Iterable[Any], *, key=None) -> Any:
  """The field's value, which must be one of `choices` (after `key`, e.g. an alias map)."""
  v, field = value(config, field), name(config, field)
  choices = tuple(choices)
  k = v
  if key is not None:
    try:
      k = key(v)
    except (ValueError, KeyError, AttributeError, TypeError):
      k = None
  if k not in choices:
    raise ConfigError(f"{field} must be one of {choices}, got {_shown(v)}")
  return v


def size_hw(config: Mapping, field: str) -> tuple[int, int]:
  """An image size (H, W) of two positive integers."""
  v, field = value(config, field), name(config, field)
  if (not isinstance(v, (tuple, list)) or len(v) != 2 or not all(_is_int(x) and x > 0 for x in v)):
    raise ConfigError(f"{field} must be (H, W), two positive integers "
                      f"(e.g. --config.{field}='(256, 128)'), got {_shown(v)}")
  return int(v[0]), int(v[1])


def sequence(config: Mapping, field: str, *, length: Optional[int] = None,
             item=None) -> Sequence:
  """A tuple/list (of `length` items, each passing `item(x)` if given)."""
  v, field = value(config, field), name(config, field)
  if not isinstance(v, (tuple, list)) or (length is not None and len(v) != length) or (
      item is not None and not all(item(x) for x in v)):
    n = f"{length} " if length is not None else ""
    raise ConfigError(f"{field} must be a sequence of {n}values, got {_shown(v)}")
  return v


def existing_path(config: Mapping, field: str, *, kind: str = "any",
                  required: bool = False) -> str:
  """A path that exists when set ('file', 'dir' or 'any'); empty is allowed unless required."""
  v, field = value(config, field), name(config, field)
  if v is None or v == "":
    if required:
      raise ConfigError(f"set {field} (a {'folder' if kind == 'dir' else 'file'})")
    return ""
  if not isinstance(v, str):
    raise ConfigError(f"{field} must be a path, got {_shown(v)}")
  path = os.path.expanduser(v)
  ok = {"file": os.path.isfile, "dir": os.path.isdir, "any": os.path.exists}[kind](path)
  if not ok:
    what = {"file": "file", "dir": "folder", "any": "path"}[kind]
    if os.path.exists(path):
      raise ConfigError(f"{field}={v!r} is not a {what}")
    raise FileNotFoundError(f"{field}: {what} not found: {v}")
  return v


def stage_fields(config: Mapping, stage: str, *, batch_size: bool = False) -> None:
  """The fields of a `trainer.stage_defaults()` stage that a run reads: its length, its
  intervals and (if the stage has one) its batch size."""
  epochs = integer(config, f"{stage}.total_epochs", minimum=0)
  steps = integer(config, f"{stage}.total_steps", minimum=0)
  if not epochs and not steps:
    raise ConfigError(f"{name(config, stage)}.total_epochs or .total_steps must be positive, "
                      "got 0 and 0")
  if batch_size:
    positive(config, f"{stage}.batch_size")
  integer(config, f"{stage}.ckpt_every_steps", minimum=0)
  positive(config, f"{stage}.log_every_steps")
  positive(config, f"{stage}.keep_checkpoints")
  number(config, f"{stage}.optimizer.lr", minimum=0.0, strictly=True)
  number(config, f"{stage}.optimizer.weight_decay", minimum=0.0)
  if value(config, stage).get("precision") is not None:
    precision(config, f"{stage}.precision")
  existing_path(config, f"{stage}.resume", kind="dir")


def precision(config: Mapping, field: str) -> str:
  """A compute precision name ('float32', 'bfloat16', ...)."""
  return one_of(config, field, sorted(precision_lib._DTYPES))  # pylint: disable=protected-access
