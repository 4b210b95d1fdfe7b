"""Config fields that were renamed, so that the launcher can name the new field.

The families share one vocabulary: `data.name`, `model.weights`, `model.tiny_random` with
the settings in `model.tiny`, `eval.batch_size`, `model.released_checkpoint`, top-level
`precision`. An override of an old name (at any depth, e.g. the default job's
`--config.clipreid.model.clip_weights`) is answered with the new one.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

# old dotted suffix -> new dotted suffix
RENAMED = {
    "model.clip_weights": "model.weights",
    "model.vit_weights": "model.weights",
    "clip.weights": "model.weights",
    "clip.image_size": "model.image_size",
    "clip.precision": "precision",
    "released.path": "model.released_checkpoint",
    "data.dataset": "data.name",
    "data.eval_batch_size": "eval.batch_size",
    "data.test_batch_size": "eval.batch_size",
    "model.tiny_random.enabled": "model.tiny_random",
}
# clipreid's tiny settings moved from model.tiny_random.<field> to model.tiny.<field>.
_TINY_FIELD = re.compile(r"(^|\.)model\.tiny_random\.(?!enabled$)(\w+)$")


def new_name(field: str) -> Optional[str]:
  """The current name of a renamed dotted config field, or None if it was not renamed."""
  for old, new in RENAMED.items():
    if field == old or field.endswith("." + old):
      return field[:len(field) - len(old)] + new
  m = _TINY_FIELD.search(field)
  if m:
    return field[:m.start()] + f"{m.group(1)}model.tiny.{m.group(2)}"
  return None


def hint(argv: Sequence[str], flag: str = "config") -> Optional[str]:
  """One message naming the new field of every `--<flag>.<old name>` override in argv."""
  found = []
  for arg in argv:
    m = re.match(rf"--{re.escape(flag)}\.([\w.]+)(=|$)", arg)
    new = new_name(m.group(1)) if m else None
    if new:
      found.append(f"--{flag}.{m.group(1)} is now --{flag}.{new}")
  if not found:
    return None
  return "renamed config field" + ("s" if len(found) > 1 else "") + ": " + "; ".join(found)
