"""Each family's `tiny` config for launcher tests: `--config tests/tiny_configs.py:FAMILY[,ROOT]`.

FAMILY: clipreid (a tiny random CLIP on the Market-1501-layout folder ROOT) | lpt | vpt
(tiny random ViTs on the generated long-tailed set).
"""
from __future__ import annotations

from jaxprompt.clipreid import config as clipreid_config
from jaxprompt.lpt import config as lpt_config


def get_config(arg: str = "lpt"):
  family, _, root = arg.partition(",")
  if family == "clipreid":
    return clipreid_config.tiny(clipreid_config.paper_config("market1501", "vit_b16", "clipreid"),
                                root)
  if family in ("lpt", "vpt"):
    return lpt_config.tiny(lpt_config.paper_config("places_lt",
                                                   "lpt" if family == "lpt" else "vpt_deep"))
  raise ValueError(f"unknown family {family!r}: clipreid, lpt or vpt")
