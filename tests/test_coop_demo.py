"""The CoOp demonstration: a contrastively trained tiny CLIP is well above chance zero-shot, and
zero-shot / CoOp / CoCoOp each give a base, new and H row."""
from __future__ import annotations

from jaxprompt.coop import demo
from jaxprompt.coop import evaluate


def test_demo_rows(tmp_path):
  out = demo.run(str(tmp_path), pretrain_steps=250, per_class_test=6)
  assert set(out["rows"]) == {"zeroshot", "coop", "cocoop"}
  for row in out["rows"].values():
    assert set(row) == {"base", "new", "H"}
    assert abs(row["H"] - evaluate.harmonic(row["base"], row["new"])) < 1e-9
  zs = out["rows"]["zeroshot"]
  assert min(zs["base"], zs["new"]) > 2 * out["chance"], (zs, out["chance"])
