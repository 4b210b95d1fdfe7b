"""The timm/AugReg ViT tower against timm itself, on tiny random models written by the test."""
from __future__ import annotations

import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm_vit_mod = pytest.importorskip("timm.models.vision_transformer")

from jaxprompt.convert import timm_vit  # noqa: E402
from jaxprompt.convert.io import WeightMismatchError, write_arrays  # noqa: E402
from jaxprompt.convert.timm_vit import load_vit
from jaxprompt.models.vit import ViTConfig  # noqa: E402

TOL = 1e-4


def make_timm(img_size=32, patch=8, dim=64, depth=2, num_classes=10, eps=1e-6, seed=0):
  """A tiny timm ViT with random weights everywhere (LayerNorms included)."""
  torch.manual_seed(seed)
  m = timm_vit_mod.VisionTransformer(
      img_size=img_size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=dim // 64,
      num_classes=num_classes, norm_layer=partial(torch.nn.LayerNorm, eps=eps)).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
        p.copy_(1 + 0.3 * torch.randn_like(p))
      elif "mlp.fc2.weight" in name:
        p.normal_(0, 0.5)  # large MLP outputs make the GELU flavour visible
      else:
        p.normal_(0, 0.3)
  return m


def state_dict(m) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}


def images(h=32, w=32, b=2, seed=0) -> np.ndarray:
  return np.random.RandomState(seed).randn(b, h, w, 3).astype(np.float32)


@torch.no_grad()
def torch_forward(m, x: np.ndarray, deep=None, shallow=None) -> np.ndarray:
  """Reference on the timm model. deep: per-block list of None or (B, T, D) tensors,
  appended after the tokens and dropped after the block; shallow: (B, S, D) after CLS."""
  t = m._pos_embed(m.patch_embed(torch.from_numpy(x).permute(0, 3, 1, 2)))
  if shallow is not None:
    t = torch.cat([t[:, :1], shallow, t[:, 1:]], dim=1)
  for i, blk in enumerate(m.blocks):
    p = None if deep is None else deep[i]
    if p is None:
      t = blk(t)
    else:
      n = t.shape[1]
      t = blk(torch.cat([t, p], dim=1))[:, :n]
  return m.norm(t)[:, 0].numpy()


@torch.no_grad()
def timm_feature(m, x: np.ndarray) -> np.ndarray:
  t = torch.from_numpy(x).permute(0, 3, 1, 2)
  return m.forward_head(m.forward_features(t), pre_logits=True).numpy()


@functools.lru_cache(maxsize=None)
def jit_apply(model):
  """`model.apply`, compiled (whole graphs compile faster than op-by-op dispatch)."""
  return jax.jit(model.apply, static_argnames=("method", "prompt_start", "start", "stop"))


def maxdiff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.fixture(scope="module")
def tiny():
  m = make_timm()
  return m, state_dict(m)


def to_augreg(sd: dict[str, np.ndarray], heads: int, head: bool = True) -> dict[str, np.ndarray]:
  """The inverse mapping: a timm state dict written in AugReg/vit_jax npz names."""
  d = sd["cls_token"].shape[-1]
  hd = d // heads
  depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
  out = {"cls": sd["cls_token"],
         "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"],
         "Transformer/encoder_norm/bias": sd["norm.bias"]}
  if head and "head.weight" in sd:
    out["head/kernel"] = sd["head.weight"].T
    out["head/bias"] = sd["head.bias"]
  for i in range(depth):
    s, t = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    a = t + "MultiHeadDotProductAttention_1/"
    for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
      out[f"{t}{ln}/scale"], out[f"{t}{ln}/bias"] = sd[f"{s}{norm}.weight"], sd[f"{s}{norm}.bias"]
    w, b = sd[s + "attn.qkv.weight"], sd[s + "attn.qkv.bias"]
    for j, n in enumerate(("query", "key", "value")):
      out[f"{a}{n}/kernel"] = w[j * d:(j + 1) * d].T.reshape(d, heads, hd)
      out[f"{a}{n}/bias"] = b[j * d:(j + 1) * d].reshape(heads, hd)
    out[a + "out/kernel"] = sd[s + "attn.proj.weight"].T.reshape(heads, hd, d)
    out[a + "out/bias"] = sd[s + "attn.proj.bias"]
    for j, n in enumerate(("fc1", "fc2")):
      out[f"{t}MlpBlock_3/Dense_{j}/kernel"] = sd[f"{s}mlp.{n}.weight"].T
      out[f"{t}MlpBlock_3/Dense_{j}/bias"] = sd[f"{s}mlp.{n}.bias"]
  return out


# ---------------------------------------------------------------- loading and parity

@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_parity_with_timm_from_files(tiny, tmp_path, suffix):
  m, sd = tiny
  path = tmp_path / f"vit{suffix}"
  if suffix == ".pt":
    torch.save(m.state_dict(), path)
  else:
    write_arrays(str(path), sd)
  model, variables = load_vit(str(path))
  assert set(variables) == {"params"} and set(variables["params"]) == {"img"}
  assert "head" not in variables["params"]["img"]
  assert model.img.config == ViTConfig(patch=8, width=64, depth=2, heads=1, mlp_dim=256,
                                       grid=(4, 4))
  x = images()
  assert maxdiff(jit_apply(model)(variables, x), timm_feature(m, x)) <= TOL


def test_parity_non_square_and_eps_1e5(tmp_path):
  # 2 heads, patch 16, no classifier, LayerNorm eps 1e-5 (LPT's setting).
  m = make_timm(patch=16, dim=128, num_classes=0, eps=1e-5, seed=1)
  sd = state_dict(m)
  model, variables = load_vit(sd, ln_eps=1e-5)
  x = images()
  assert maxdiff(jit_apply(model)(variables, x), timm_feature(m, x)) <= TOL

  # timm at 48x32 with its own bilinear, no-antialias resample of the 2x2 grid to 3x2.
  big = timm_vit_mod.VisionTransformer(
      img_size=(48, 32), patch_size=16, embed_dim=128, depth=2, num_heads=2, num_classes=0,
      norm_layer=partial(torch.nn.LayerNorm, eps=1e-5)).eval()
  sd48 = dict(m.state_dict())
  sd48["pos_embed"] = timm_vit_mod.resample_abs_pos_embed(
      sd48["pos_embed"], new_size=(3, 2), old_size=(2, 2), num_prefix_tokens=1,
      interpolation="bilinear", antialias=False)
  big.load_state_dict(sd48)
  model48, v48 = load_vit(sd, image_size=(48, 32), ln_eps=1e-5)
  assert model48.img.config.grid == (3, 2)
  x = images(48, 32)
  assert maxdiff(jit_apply(model48)(v48, x), timm_feature(big, x)) <= TOL
  # Asking for the wrong size says how to fix it.
  with pytest.raises(ValueError, match="image_size"):
    jit_apply(model)(variables, x)


def test_gelu_flavour_matters(tiny):
  m, sd = tiny
  x = images()
  ref = timm_feature(m, x)
  exact_model, v = load_vit(sd)
  tanh_model, _ = load_vit(sd, exact_gelu=False)
  assert maxdiff(jit_apply(exact_model)(v, x), ref) <= TOL
  assert maxdiff(jit_apply(tanh_model)(v, x), ref) > 3 * TOL


def test_augreg_npz_matches_timm_layout(tmp_path):
  m = make_timm(patch=16, dim=128, num_classes=10, seed=2)
  sd = state_dict(m)
  path = tmp_path / "B_tiny-augreg.npz"
  write_arrays(str(path), {**to_augreg(sd, heads=2),
                           "pre_logits/kernel": np.zeros((128, 128), np.float32)})
  arrays = dict(np.load(path))
  assert timm_vit.detect_layout(arrays) == "augreg"
  assert timm_vit.detect_layout(sd) == "timm"
  assert timm_vit.infer_config(arrays) == timm_vit.infer_config(sd)
  assert "classifier head head/kernel (128, 10)" in timm_vit.head_info(arrays)
  m_npz, v_npz = load_vit(str(path))
  m_pt, v_pt = load_vit(sd)
  for a, b in zip(jax.tree.leaves(v_npz), jax.tree.leaves(v_pt)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = images()
  out = jit_apply(m_npz)(v_npz, x)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jit_apply(m_pt)(v_pt, x)))
  assert maxdiff(out, timm_feature(m, x)) <= TOL


def test_big_vision_npz_variant(tiny):
  # big_vision names, stacked (scanned) blocks under params/, and a position
  # table without a class row (its class token carries that row instead).
  m, sd = tiny
  classic = to_augreg(sd, heads=1)
  bv = {}
  ren = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
         "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
  stacked: dict[str, list] = {}
  for k, v in classic.items():
    if k.startswith("Transformer/encoderblock_"):
      _, blk, part, rest = k.split("/", 3)
      stacked.setdefault(f"Transformer/encoderblock/{ren.get(part, part)}/{rest}", []).append(v)
    else:
      bv[k] = v
  bv.update({k: np.stack(v) for k, v in stacked.items()})
  pe = bv.pop("Transformer/posembed_input/pos_embedding")
  bv["cls"] = bv["cls"] + pe[:, :1]
  bv["pos_embedding"] = pe[:, 1:]
  bv = {"params/" + k: v for k, v in bv.items()}
  model, variables = load_vit(bv)
  x = images()
  assert maxdiff(jit_apply(model)(variables, x), timm_feature(m, x)) <= TOL


def test_wrong_files_name_the_key(tiny, tmp_path):
  m, sd = tiny
  broken = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
  with pytest.raises(WeightMismatchError, match=r"missing\s+blocks\.1\.mlp\.fc2\.bias"):
    load_vit(broken)
  extra = {**sd, "blocks.0.ls1.gamma": np.ones(64, np.float32)}
  with pytest.raises(WeightMismatchError, match=r"unexpected blocks\.0\.ls1\.gamma"):
    load_vit(extra)
  bad = {**sd, "norm.bias": np.zeros(65, np.float32)}
  with pytest.raises(WeightMismatchError, match=r"shape\s+norm\.bias"):
    load_vit(bad)
  npz = to_augreg(sd, heads=1)
  del npz["Transformer/encoderblock_0/LayerNorm_2/scale"]
  path = tmp_path / "broken.npz"
  write_arrays(str(path), npz)
  with pytest.raises(WeightMismatchError, match="encoderblock_0/LayerNorm_2/scale"):
    load_vit(str(path))
  with pytest.raises(WeightMismatchError, match="patch_embed.proj.weight"):
    load_vit({"text_projection": np.zeros((4, 4), np.float32)})


# ---------------------------------------------------------------- prompts

@pytest.fixture(scope="module")
def loaded(tiny):
  m, sd = tiny
  model, variables = load_vit(sd)
  return m, model, variables


def test_deep_prompts_shared_and_per_sample(loaded):
  m, model, v = loaded
  x = images(b=3)
  rng = np.random.RandomState(3)
  shared = rng.randn(2, 4, 64).astype(np.float32)  # every block
  out = jit_apply(model)(v, x, shared)
  ref = torch_forward(m, x, deep=[torch.from_numpy(shared[i]).expand(3, 4, 64) for i in range(2)])
  assert maxdiff(out, ref) <= TOL
  assert maxdiff(out, jit_apply(model)(v, x)) > 1e-2  # the prompts do something

  # Per-sample prompts for the last block only; block 0 runs without prompts.
  per = rng.randn(3, 1, 5, 64).astype(np.float32)
  ref = torch_forward(m, x, deep=[None, torch.from_numpy(per[:, 0])])
  assert maxdiff(jit_apply(model)(v, x, per, prompt_start=1), ref) <= TOL
  assert maxdiff(jit_apply(model)(v, x, per, prompt_start=-1), ref) <= TOL
  # Fewer prompt layers than blocks, from block 0: later blocks run unprompted.
  ref = torch_forward(m, x, deep=[torch.from_numpy(per[:, 0]), None])
  assert maxdiff(jit_apply(model)(v, x, per), ref) <= TOL
  with pytest.raises(ValueError, match="do not fit"):
    jit_apply(model)(v, x, shared, prompt_start=1)


def test_shallow_prompts(loaded):
  m, model, v = loaded
  x = images(b=2)
  rng = np.random.RandomState(4)
  s = rng.randn(3, 64).astype(np.float32)
  ref = torch_forward(m, x, shallow=torch.from_numpy(s).expand(2, 3, 64))
  assert maxdiff(jit_apply(model)(v, x, shallow_prompts=s), ref) <= TOL
  per = rng.randn(2, 3, 64).astype(np.float32)
  ref = torch_forward(m, x, shallow=torch.from_numpy(per))
  assert maxdiff(jit_apply(model)(v, x, shallow_prompts=per), ref) <= TOL


def test_lpt_phase2_prompts_and_split_forward(loaded):
  m, model, v = loaded
  b = 2
  x = images(b=b)
  rng = np.random.RandomState(5)
  shared = rng.randn(2, 3, 64).astype(np.float32)  # all blocks
  group = rng.randn(b, 1, 3, 64).astype(np.float32)  # per sample, last block
  sh = [torch.from_numpy(shared[i]).expand(b, 3, 64) for i in range(2)]
  ref = torch_forward(m, x, deep=[sh[0], torch.cat([sh[1], torch.from_numpy(group[:, 0])], 1)])
  out = jit_apply(model)(v, x, (shared, group), prompt_start=(0, -1))
  assert maxdiff(out, ref) <= TOL

  # LPT fast inference: the first block is shared by the query pass and the main pass.
  run = jit_apply(model)
  h0 = run(v, x, method="embed")
  h1 = run(v, h0, shared, start=0, stop=1, method="run_blocks")
  query = run(v, run(v, h1, shared, start=1, method="run_blocks"), method="head_feature")
  tail = run(v, h1, (shared, group), prompt_start=(0, 1), start=1, method="run_blocks")
  feat = run(v, tail, method="head_feature")
  assert maxdiff(query, run(v, x, shared)) <= 1e-6
  assert maxdiff(feat, out) <= 1e-6

  # Shallow prompts through the split API as well.
  s = rng.randn(2, 64).astype(np.float32)
  e = run(v, x, s, method="embed")
  assert e.shape == (b, 1 + 2 + 16, 64)
  split = run(v, run(v, e, method="run_blocks"), method="head_feature")
  assert maxdiff(split, run(v, x, shallow_prompts=s)) <= 1e-6


def test_prompt_gradients_and_jit(loaded):
  _, model, v = loaded
  x = images(b=2)
  shared = jnp.zeros((2, 3, 64))

  @jax.jit
  def loss(p):
    return jnp.sum(model.apply(v, x, p) ** 2)

  g = jax.grad(loss)(shared)
  assert g.shape == shared.shape and float(jnp.abs(g).max()) > 0


def test_bf16_compute(loaded):
  m, _, v = loaded
  model16, _ = load_vit(state_dict(m), dtype=jnp.bfloat16)
  x = images()
  out = jit_apply(model16)(v, x)
  assert out.dtype == jnp.float32
  ref = timm_feature(m, x)
  assert maxdiff(out, ref) < 0.1 * float(np.abs(ref).max())
