"""The CoOp demonstration: a contrastively trained tiny CLIP is well above chance zero-shot, and
zero-shot / CoOp / CoCoOp each give a base, new and H row."""
from __future__ import annotations

import jax
import jax.numpy as jnp

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
  # The pretrained CLIP is kept for a rerun (resume) and read back, not trained again.
  _, variables, loss = demo._load_or_pretrain(str(tmp_path / "clip.npz"), 250, 0)
  assert loss == out["pretrain_loss"]
  assert variables["params"]["txt"]["token_embedding"].shape[-1] == 64
  # ...with exactly the model's leaves (an extra one would change the frozen-weights
  # fingerprint the resumed stages compare against).
  shapes = jax.eval_shape(demo.CLIP(demo.tiny_config()).init, jax.random.key(0),
                          jnp.zeros((1, demo.SIZE, demo.SIZE, 3)), jnp.zeros((1, 8), jnp.int32))
  assert jax.tree.structure(shapes["params"]) == jax.tree.structure(variables["params"])
