"""Parity of jaxprompt's CLIP towers and loader with open_clip, on tiny random models.

The torch references are open_clip `CLIP` models (QuickGELU, OpenAI layout) with
every weight randomised, BatchNorm running statistics included. CLIP-ReID's input
changes (non-square size, overlapping ViT patches, RN50 last stride 1) are applied
to the torch model the way CLIP-ReID does it, and compared with `load_clip(...,
image_size=..., patch_stride=..., last_stride=...)`.
"""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip_model = pytest.importorskip("open_clip.model")

from jaxprompt.convert import openai_clip  # noqa: E402
from jaxprompt.convert.io import WeightMismatchError  # noqa: E402
from jaxprompt.convert.openai_clip import load_clip  # noqa: E402
from torch_fixtures import close as _close  # noqa: E402
from torch_fixtures import images as _images  # noqa: E402
from torch_fixtures import nchw as _nchw  # noqa: E402
from torch_fixtures import randomise as _randomise  # noqa: E402
from torch_fixtures import resize_pos as _resize_pos  # noqa: E402

TOL = 1e-4
CTX, VOCAB = 16, 100
TEXT_CFG = dict(context_length=CTX, vocab_size=VOCAB, width=128, heads=2, layers=2)
VIT_CFG = dict(layers=3, width=128, patch_size=16, image_size=64)  # 2 heads, 4x4 grid
RN_CFG = dict(layers=(1, 1, 1, 1), width=16, image_size=64)  # attnpool: 512 wide, 8 heads, 2x2


def _build(vision_cfg, seed):
  torch.manual_seed(seed)
  m = open_clip_model.CLIP(64, vision_cfg, TEXT_CFG, quick_gelu=True)
  return _randomise(m, seed)


@pytest.fixture(scope="module")
def vit():
  return _build(VIT_CFG, 0)


@pytest.fixture(scope="module")
def rn():
  return _build(RN_CFG, 1)


def _apply(model, variables, *args, **kwargs):
  """`model.apply` under one jit: far fewer compilations than op-by-op dispatch."""
  fn = jax.jit(model.apply, static_argnames=("method", "mutable", "train"))
  return fn(variables, *args, **kwargs)


def _token_ids(seed=0):
  """SOT ... EOT then zero padding; EOT (the largest id) at different positions."""
  rs = np.random.RandomState(seed)
  ids = np.zeros((3, CTX), np.int64)
  for i, n in enumerate([3, 9, CTX]):
    ids[i, 0] = VOCAB - 2
    ids[i, 1:n - 1] = rs.randint(1, VOCAB - 2, n - 2)
    ids[i, n - 1] = VOCAB - 1
  return ids


# -- torch references for CLIP-ReID's intermediate features ------------------------------------


@torch.no_grad()
def _torch_vit_features(visual, x, cv_embed=None):
  t = visual.conv1(x)
  t = t.flatten(2).transpose(1, 2)
  cls = visual.class_embedding.expand(t.shape[0], 1, -1)
  if cv_embed is not None:
    cls = cls + cv_embed[:, None]
  t = torch.cat([cls, t], dim=1) + visual.positional_embedding
  t = visual.ln_pre(t)
  blocks = visual.transformer.resblocks
  assert visual.transformer.batch_first
  for i, blk in enumerate(blocks):
    t = blk(t)
    if i == len(blocks) - 2:
      last = t
  final = visual.ln_post(t)
  return {"last": last[:, 0], "final": final[:, 0], "proj": (final @ visual.proj)[:, 0]}


def _torch_rn_features(visual, x):
  t = visual.layer2(visual.layer1(visual.stem(x)))
  x3 = visual.layer3(t)
  x4 = visual.layer4(x3)
  return {"last": x3.mean((2, 3)), "final": x4.mean((2, 3)), "proj": visual.attnpool(x4)}


# -- tests ------------------------------------------------------------------------------------


def test_vit_native_from_pt_file(vit, tmp_path):
  path = tmp_path / "vit.pt"
  torch.save(vit.state_dict(), path)
  model, variables = load_clip(str(path))
  cfg = model.config
  assert (cfg.vision, cfg.vision_width, cfg.vision_layers, cfg.vision_heads) == ("vit", 128, 3, 2)
  assert (cfg.patch_size, cfg.pretrained_grid, cfg.embed_dim) == (16, 4, 64)
  assert (cfg.text_width, cfg.text_heads, cfg.text_layers) == (128, 2, 2)
  assert set(variables) == {"params"} and set(variables["params"]) == {"img", "txt"}
  np.testing.assert_allclose(variables["params"]["txt"]["logit_scale"],
                             vit.logit_scale.item(), rtol=1e-6)

  x = _images(2, 64, 64)
  with torch.no_grad():
    ref = vit.encode_image(_nchw(x))
  _close(_apply(model, variables, x, method="encode_image"), ref)

  feats = _apply(model, variables, x, method="image_features")
  ref = _torch_vit_features(vit.visual, _nchw(x))
  for k in ("last", "final", "proj"):
    _close(feats[k], ref[k])
  assert feats["last_tokens"].shape == (2, 17, 128)
  assert feats["proj_tokens"].shape == (2, 17, 64)
  _close(feats["proj_tokens"][:, 0], ref["proj"])


def test_torchscript_archive(vit, tmp_path):
  x = _images(1, 64, 64)
  ids = _token_ids()[:1]
  traced = torch.jit.trace(vit, (_nchw(x), torch.from_numpy(ids)), check_trace=False)
  path = tmp_path / "vit_jit.pt"
  traced.save(str(path))
  model, variables = load_clip(str(path))
  with torch.no_grad():
    ref = vit.encode_image(_nchw(x))
  _close(_apply(model, variables, x, method="encode_image"), ref)


def test_text_tower(vit):
  model, variables = load_clip(vit.state_dict())
  ids = _token_ids()
  with torch.no_grad():
    ref = vit.encode_text(torch.from_numpy(ids))
  ours = _apply(model, variables, ids, method="encode_text")
  _close(ours, ref)

  emb = _apply(model, variables, ids, method="embed_tokens")
  _close(emb, vit.token_embedding.weight[torch.from_numpy(ids)])
  eot = ids.argmax(-1)
  _close(_apply(model, variables, emb, eot, method="encode_text_embeddings"), ours, tol=1e-6)

  # Learned prompts: replace some token rows, compare with a manual torch forward.
  ctx = np.random.RandomState(3).randn(3, 4, 128).astype(np.float32) * 0.05
  emb = np.asarray(emb).copy()
  emb[:, 1:5] = ctx
  with torch.no_grad():
    t = torch.from_numpy(emb) + vit.positional_embedding
    t = vit.ln_final(vit.transformer(t, attn_mask=vit.attn_mask))
    ref = t[torch.arange(3), torch.from_numpy(eot)] @ vit.text_projection
  _close(_apply(model, variables, emb, eot, method="encode_text_embeddings"), ref)


def test_vit_256x128_overlapping_patches_and_sie(vit):
  h, w, stride = 256, 128, 12
  grid = ((h - 16) // stride + 1, (w - 16) // stride + 1)
  assert grid == (21, 10)
  visual = copy.deepcopy(vit.visual)
  visual.conv1.stride = (stride, stride)
  with torch.no_grad():
    visual.positional_embedding = torch.nn.Parameter(
        _resize_pos(visual.positional_embedding, grid))

  model, variables = load_clip(vit.state_dict(), image_size=(h, w), patch_stride=stride)
  assert model.config.grid == grid
  assert variables["params"]["img"]["positional_embedding"].shape == (1 + 210, 128)
  x = _images(2, h, w, seed=1)
  with torch.no_grad():
    ref = visual(_nchw(x))
  _close(_apply(model, variables, x, method="encode_image"), ref)

  cv = np.random.RandomState(2).randn(2, 128).astype(np.float32) * 0.02
  feats = _apply(model, variables, x, cv, method="image_features")
  ref = _torch_vit_features(visual, _nchw(x), torch.from_numpy(cv))
  for k in ("last", "final", "proj"):
    _close(feats[k], ref[k])


def test_rn_native_from_pt_file(rn, tmp_path):
  path = tmp_path / "rn.pt"
  torch.save(rn.state_dict(), path)
  model, variables = load_clip(str(path))
  cfg = model.config
  assert (cfg.vision, cfg.vision_width, cfg.vision_layers) == ("resnet", 16, (1, 1, 1, 1))
  assert (cfg.vision_heads, cfg.pretrained_grid, cfg.embed_dim) == (8, 2, 64)
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["batch_stats"]) == {"img"}

  x = _images(2, 64, 64)
  with torch.no_grad():
    ref = rn.encode_image(_nchw(x))
    ref_feats = _torch_rn_features(rn.visual, _nchw(x))
  _close(_apply(model, variables, x, method="encode_image"), ref)
  feats = _apply(model, variables, x, method="image_features")
  for k in ("last", "final", "proj"):
    _close(feats[k], ref_feats[k])
  assert feats["last"].shape == (2, 256) and feats["final"].shape == (2, 512)


def test_rn_from_dict_256x128_last_stride_1(rn):
  h, w = 256, 128
  visual = copy.deepcopy(rn.visual)
  visual.layer4[0].avgpool = torch.nn.Identity()
  visual.layer4[0].downsample._modules["-1"] = torch.nn.Identity()
  with torch.no_grad():
    visual.attnpool.positional_embedding = torch.nn.Parameter(
        _resize_pos(visual.attnpool.positional_embedding, (h // 16, w // 16)))

  # A dict of torch tensors with a DataParallel prefix, passed directly.
  sd = {"module." + k: v for k, v in rn.state_dict().items()}
  model, variables = load_clip(sd, image_size=(h, w), last_stride=1)
  assert model.config.grid == (16, 8)
  x = _images(2, h, w, seed=4)
  with torch.no_grad():
    ref = visual(_nchw(x))
    ref_feats = _torch_rn_features(visual, _nchw(x))
  _close(_apply(model, variables, x, method="encode_image"), ref)
  feats = _apply(model, variables, x, method="image_features")
  for k in ("last", "final", "proj"):
    _close(feats[k], ref_feats[k])
  assert feats["final_map"].shape == (2, 16, 8, 512)


def test_rn_train_mode_batch_statistics(rn):
  sd = {k: v.numpy() for k, v in rn.state_dict().items()}
  model, variables = load_clip(sd)
  x = _images(4, 64, 64, seed=5)
  visual = copy.deepcopy(rn.visual).train()
  with torch.no_grad():
    ref = _torch_rn_features(visual, _nchw(x))
  feats, updated = _apply(model, variables, x, train=True, method="image_features",
                               mutable=("batch_stats",))
  for k in ("last", "final", "proj"):
    _close(feats[k], ref[k])
  stats = updated["batch_stats"]["img"]
  _close(stats["bn1"]["mean"], visual.bn1.running_mean)
  _close(stats["layer4_0"]["bn3"]["mean"], visual.layer4[0].bn3.running_mean)
  # torch feeds the unbiased batch variance into running_var; so do we. With
  # n = batch * H * W = 16 here, the biased one would be off by ~0.6%.
  for name, ref_bn in (("bn1", visual.bn1), ("layer4_0/bn3", visual.layer4[0].bn3)):
    node = stats
    for part in name.split("/"):
      node = node[part]
    _close(node["var"], ref_bn.running_var)
  # Eval mode does not touch the statistics.
  _, same = _apply(model, variables, x, method="image_features", mutable=("batch_stats",))
  np.testing.assert_array_equal(same["batch_stats"]["img"]["bn1"]["mean"],
                                variables["batch_stats"]["img"]["bn1"]["mean"])


def test_bf16_compute_float32_params(vit):
  model32, variables = load_clip(vit.state_dict())
  model16, variables16 = load_clip(vit.state_dict(), dtype=jnp.bfloat16)
  assert variables16["params"]["img"]["proj"].dtype == jnp.float32
  x = _images(2, 64, 64)
  ref = np.asarray(_apply(model32, variables, x, method="encode_image"))
  out = _apply(model16, variables16, x, method="encode_image")
  assert out.dtype == jnp.float32
  assert np.abs(np.asarray(out) - ref).max() < 0.05 * np.abs(ref).max()


def test_mismatch_names_the_keys(vit):
  sd = dict(vit.state_dict())
  del sd["visual.ln_post.bias"]
  sd["transformer.resblocks.1.attn.in_proj_weight"] = torch.zeros(100, 128)
  sd["visual.extra.weight"] = torch.zeros(3)
  with pytest.raises(WeightMismatchError) as e:
    load_clip(sd)
  msg = str(e.value)
  assert "missing   visual.ln_post.bias" in msg
  assert "transformer.resblocks.1.attn.in_proj_weight" in msg and "(384, 128)" in msg
  assert "unexpected visual.extra.weight" in msg

  with pytest.raises(WeightMismatchError, match="visual.conv1.weight|text_projection"):
    openai_clip.infer_config({"head.weight": np.zeros((3, 3))})


def test_input_validation(vit, rn):
  with pytest.raises(ValueError, match="patch_stride"):
    load_clip(rn.state_dict(), patch_stride=8)
  with pytest.raises(ValueError, match="last_stride"):
    load_clip(vit.state_dict(), last_stride=1)
  model, variables = load_clip(vit.state_dict())
  with pytest.raises(ValueError, match="image_size"):
    _apply(model, variables, _images(1, 96, 64), method="encode_image")
