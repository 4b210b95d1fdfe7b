"""Converters for the authors' released CLIP-ReID and LPT checkpoints.

Tiny torch models are saved under the reference names (Syliz517/CLIP-ReID
`make_model_clipreid.py` / `make_model.py`, DongSky/LPT `PromptModels_pool*/
structure.py`), converted, and run by our towers against torch forwards that
follow the reference code: CLIP-ReID at a 256x128 input with overlapping
patches (stride 12, a 21x10 grid stored in the file) and SIE, RN with last
stride 1 (16x8), LPT with shared + top-k-averaged group prompts.
"""
from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip_model = pytest.importorskip("open_clip.model")
timm_vit_mod = pytest.importorskip("timm.models.vision_transformer")

from jaxprompt.clipreid import released as clipreid_ckpt
from jaxprompt.lpt import released as lpt_ckpt  # noqa: E402
from jaxprompt.convert.io import WeightMismatchError  # noqa: E402
from jaxprompt.clipreid import model as clipreid  # noqa: E402
from jaxprompt.tokenizer import tokenize  # noqa: E402
from torch_fixtures import clipreid_vit_state_dict  # noqa: E402
from torch_fixtures import close as _close  # noqa: E402
from torch_fixtures import heads as _heads  # noqa: E402
from torch_fixtures import images as _images  # noqa: E402
from torch_fixtures import lpt_torch as _lpt_torch  # noqa: E402
from torch_fixtures import nchw as _nchw  # noqa: E402
from torch_fixtures import randomise as _randomise  # noqa: E402
from torch_fixtures import resize_pos as _resize_pos  # noqa: E402

TOL = 1e-4
NUM_IDS, NUM_CAMS, SIE_COE = 5, 6, 1.0
TEXT_CFG = dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2)
VIT_CFG = dict(layers=3, width=128, patch_size=16, image_size=64)
RN_CFG = dict(layers=(1, 1, 1, 1), width=16, image_size=64)
H, W = 256, 128


@functools.lru_cache(maxsize=None)
def _jit(model):
  return jax.jit(model.apply, static_argnames=("method", "prompt_start", "train"))


# -- CLIP-ReID ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clipreid_vit():
  """A CLIP-ReID ViT run at 256x128, stride 12, camera SIE: the torch parts and its state dict."""
  sd, parts = clipreid_vit_state_dict(
      image_size=(H, W), stride=12, num_ids=NUM_IDS, num_cams=NUM_CAMS, width=128,
      layers=VIT_CFG["layers"], patch=VIT_CFG["patch_size"], embed_dim=64,
      text_width=TEXT_CFG["width"], text_layers=TEXT_CFG["layers"], sie_std=0.02, seed=0)
  return dict(parts, sd=sd)


@torch.no_grad()
def _torch_vit_features(visual, x, cv_embed=None):
  """`model/clip/model.py` VisionTransformer.forward, class token of x11, x12, xproj."""
  t = visual.conv1(x).flatten(2).transpose(1, 2)
  cls = visual.class_embedding.expand(t.shape[0], 1, -1)
  if cv_embed is not None:
    cls = cls + cv_embed[:, None]
  t = visual.ln_pre(torch.cat([cls, t], dim=1) + visual.positional_embedding)
  blocks = visual.transformer.resblocks
  for i, blk in enumerate(blocks):
    t = blk(t)
    if i == len(blocks) - 2:
      last = t
  final = visual.ln_post(t)
  return {"last": last[:, 0], "final": final[:, 0], "proj": (final @ visual.proj)[:, 0]}


@torch.no_grad()
def _torch_text(clip, prefix, cls_ctx, suffix, eot):
  """`TextEncoder.forward` on `PromptLearner` output."""
  b = cls_ctx.shape[0]
  t = torch.cat([prefix.expand(b, -1, -1), cls_ctx, suffix.expand(b, -1, -1)], dim=1)
  t = clip.ln_final(clip.transformer(t + clip.positional_embedding, attn_mask=clip.attn_mask))
  return t[torch.arange(b), eot] @ clip.text_projection


def test_clipreid_vit_olp_sie(clipreid_vit, tmp_path):
  ref = clipreid_vit
  path = tmp_path / "Market1501_clipreid_12x12sie_ViT-B-16_60.pth"
  # Saved from DataParallel: every key carries `module.`; plus a BN counter.
  sd = {f"module.{k}": v for k, v in ref["sd"].items()}
  torch.save(sd, path)
  model, params, state, info = clipreid_ckpt.convert(str(path), image_size=(H, W))

  assert info["kind"] == "clipreid" and info["backbone"] == "ViT"
  assert (info["num_ids"], info["sie_rows"], info["grid"]) == (NUM_IDS, NUM_CAMS, ref["grid"])
  assert info["patch_stride"] == 12 and info["template"] is None
  assert "bottleneck.num_batches_tracked" in info["ignored"]
  assert "prompt_learner.token_prefix" in info["ignored"]
  assert set(params) == {"img", "txt", "prompt", "head"}
  assert params["img"]["positional_embedding"].shape == (1 + 21 * 10, 128)
  assert params["prompt"]["cls_ctx"].shape == (NUM_IDS, 4, 128)
  assert params["prompt"]["sie"].shape == (NUM_CAMS, 128)
  assert params["head"]["classifier"]["kernel"].shape == (128, NUM_IDS)
  assert params["head"]["classifier_proj"]["kernel"].shape == (64, NUM_IDS)
  assert set(params["head"]["bottleneck"]) == {"scale"}
  assert set(state["batch_stats"]) == {"head"}
  assert set(state["batch_stats"]["head"]["bottleneck_proj"]) == {"mean", "var"}

  # Image features with SIE (camera only) at the stored 21x10 grid.
  x = _images(2, H, W, seed=1)
  cams = np.array([0, 4])
  cv = SIE_COE * np.asarray(params["prompt"]["sie"])[cams]
  feats = _jit(model)({"params": params}, x, cv, method="image_features")
  want = _torch_vit_features(ref["visual"], _nchw(x), torch.from_numpy(cv))
  for k in ("last", "final", "proj"):
    _close(feats[k], want[k])

  # BNNeck heads in eval mode.
  head = clipreid.ReIDHead(NUM_IDS)
  out = head.apply({"params": params["head"], "batch_stats": state["batch_stats"]["head"]},
                   feats["final"], feats["proj"])
  with torch.no_grad():
    m = ref["heads"]
    bn, bnp = m["bottleneck"](want["final"]), m["bottleneck_proj"](want["proj"])
    _close(out["bn_feat"], bn)
    _close(out["logits"], m["classifier"](bn))
    _close(out["logits_proj"], m["classifier_proj"](bnp))

  # Text side from the stored prompt buffers and from the (partly) rebuilt token table.
  prompt = info["text_prompt"]
  assert prompt.eot_index == 11
  labels = np.array([3, 0, 4])
  ours = clipreid.text_features(model, {"params": params}, prompt,
                                params["prompt"]["cls_ctx"][labels])
  sdr = ref["sd"]
  want_txt = _torch_text(ref["clip"], sdr["prompt_learner.token_prefix"],
                         sdr["prompt_learner.cls_ctx"][torch.from_numpy(labels)],
                         sdr["prompt_learner.token_suffix"], 11)
  _close(ours, want_txt)
  rebuilt = clipreid.build_text_prompt(model, {"params": params}, clipreid.TEMPLATES["person"])
  np.testing.assert_array_equal(rebuilt.prefix, prompt.prefix)
  np.testing.assert_array_equal(rebuilt.suffix, prompt.suffix)
  table = np.asarray(params["txt"]["token_embedding"])
  assert np.isnan(table[1000]).all()  # not recoverable from the file


def test_clipreid_clip_weights_fill_token_table(clipreid_vit):
  clip = clipreid_vit["clip"]
  _, params, _, info = clipreid_ckpt.convert(clipreid_vit["sd"], image_size=(H, W),
                                             patch_stride=12, backbone="ViT-B-16",
                                             clip_weights=clip.state_dict())
  assert info["template"] == "person"
  _close(params["txt"]["token_embedding"], clip.token_embedding.weight, tol=0)


def test_clipreid_rn_baseline(tmp_path):
  torch.manual_seed(3)
  clip = _randomise(open_clip_model.CLIP(64, RN_CFG, TEXT_CFG, quick_gelu=True), 3)
  visual = copy.deepcopy(clip.visual)
  # CLIP-ReID's ModifiedResNet: layer4 stride 1; attention pool for the 16x8 map.
  visual.layer4[0].avgpool = torch.nn.Identity()
  visual.layer4[0].downsample._modules["-1"] = torch.nn.Identity()
  with torch.no_grad():
    visual.attnpool.positional_embedding = torch.nn.Parameter(
        _resize_pos(visual.attnpool.positional_embedding, (16, 8)))
  heads = _heads(512, 64, 4)
  sd = {f"image_encoder.{k}": v for k, v in visual.state_dict().items()}
  for name, m in heads.items():
    sd.update({f"{name}.{k}": v for k, v in m.state_dict().items()})
  path = tmp_path / "Market1501_baseline_RN50_120.pth"
  torch.save(sd, path)

  model, params, state, info = clipreid_ckpt.convert(path, image_size=(H, W), backbone="RN50")
  assert info["kind"] == "baseline" and info["last_stride"] == 1 and info["grid"] == (16, 8)
  assert set(params) == {"img", "head"} and info["text_prompt"] is None
  assert set(state["batch_stats"]) == {"img", "head"}

  x = _images(2, H, W, seed=5)
  variables = {"params": params, "batch_stats": state["batch_stats"]}
  feats = _jit(model)(variables, x, method="image_features")
  with torch.no_grad():
    t = visual.layer2(visual.layer1(visual.stem(_nchw(x))))
    x3 = visual.layer3(t)
    x4 = visual.layer4(x3)
    want = {"last": x3.mean((2, 3)), "final": x4.mean((2, 3)), "proj": visual.attnpool(x4)}
  for k in ("last", "final", "proj"):
    _close(feats[k], want[k])
  out = clipreid.ReIDHead(NUM_IDS).apply(
      {"params": params["head"], "batch_stats": state["batch_stats"]["head"]},
      feats["final"], feats["proj"])
  with torch.no_grad():
    _close(out["logits_proj"], heads["classifier_proj"](heads["bottleneck_proj"](want["proj"])))

  # A baseline run's text tower is CLIP's own: taken from clip_weights when given.
  model, params, _, info = clipreid_ckpt.convert(sd, image_size=(H, W),
                                                 clip_weights=clip.state_dict())
  assert set(params) == {"img", "txt", "head"} and info["kind"] == "baseline"
  ids = tokenize(["a photo of a person."])
  with torch.no_grad():
    _close(_jit(model)({"params": params}, ids, method="encode_text"),
           clip.encode_text(torch.from_numpy(ids.astype(np.int64))))


def test_clipreid_mismatches_are_readable(clipreid_vit):
  sd = dict(clipreid_vit["sd"])
  del sd["image_encoder.ln_post.bias"]
  sd["classifier_proj.weight"] = torch.zeros(NUM_IDS, 65)
  sd["prompt_learner.extra"] = torch.zeros(3)
  with pytest.raises(WeightMismatchError) as e:
    clipreid_ckpt.convert(sd, image_size=(H, W))
  msg = str(e.value)
  assert "missing   image_encoder.ln_post.bias  (128,)" in msg
  assert "classifier_proj.weight  model (5, 64) != file (5, 65)" in msg
  assert "unexpected prompt_learner.extra" in msg

  # The grid of another run (stride 16) against the stored 21x10 one.
  with pytest.raises(WeightMismatchError, match=r"image_encoder.positional_embedding  model "
                     r"\(129, 128\) != file \(211, 128\)[\s\S]*STRIDE_SIZE"):
    clipreid_ckpt.convert(clipreid_vit["sd"], image_size=(H, W), patch_stride=16)
  with pytest.raises(WeightMismatchError, match="SIZE_TRAIN"):
    clipreid_ckpt.convert(clipreid_vit["sd"], image_size=(384, 128))
  with pytest.raises(WeightMismatchError, match="vit image encoder, not 'RN50'"):
    clipreid_ckpt.convert(clipreid_vit["sd"], image_size=(H, W), backbone="RN50")
  with pytest.raises(WeightMismatchError, match="load_clip"):
    clipreid_ckpt.convert(clipreid_vit["clip"].state_dict(), image_size=(H, W))

  sd = dict(clipreid_vit["sd"])
  sd["bottleneck.bias"] = torch.full((128,), 0.5)
  with pytest.warns(UserWarning, match="BNNeck bias is not zero"):
    _, _, _, info = clipreid_ckpt.convert(sd, image_size=(H, W))
  assert info["bn_bias_max"] == pytest.approx(0.5)


# -- LPT ---------------------------------------------------------------------------------------

DEPTH, T, POOL, G, C, D = 4, 3, 5, 2, 7, 128


@torch.no_grad()
def _lpt_forward(m, p, x, topk=2):
  """`VPT_ViT.forward_query` + `forward_features` + `NormedLinear` (PromptModels_pool)."""
  def embed():
    return m._pos_embed(m.patch_embed(_nchw(x)))

  def run(t, extra):
    for i, blk in enumerate(m.blocks):
      add = extra(i)
      n = t.shape[1]
      t = blk(torch.cat([t, *add], dim=1))[:, :n]
    return m.norm(t)[:, 0]

  b = x.shape[0]
  shared = lambda i: p["Prompt_Tokens"][i].unsqueeze(0).expand(b, -1, -1)
  query = run(embed(), lambda i: [shared(i)])
  sim = torch.nn.functional.normalize(query) @ torch.nn.functional.normalize(
      p["Prompt_Keys"]).T
  idx = sim.topk(topk, 1, True, True)[1]
  group = p["Prompt_Tokens_pool"][idx].mean(dim=1)
  start = DEPTH - G
  feat = run(embed(), lambda i: [shared(i)] + ([group[:, i - start]] if i >= start else []))
  w = torch.nn.functional.normalize(p["head.weight"], dim=0)
  return query, idx, feat, torch.nn.functional.normalize(feat) @ w


def test_lpt_release_checkpoint(tmp_path):
  m, prompts, sd = _lpt_torch()
  path = tmp_path / "LPT_places.pth"
  torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
  model, params, info = lpt_ckpt.convert(str(path))
  assert (info["num_classes"], info["prompt_length"], info["pool_size"]) == (C, T, POOL)
  assert (info["group_layers"], info["group_start"], info["depth"]) == (G, DEPTH - G, DEPTH)
  assert model.img.ln_eps == 1e-5 and model.img.exact_gelu
  assert params["prompt"]["group"].shape == (POOL, G, T, D)
  assert params["head"]["kernel"].shape == (D, C)

  x = _images(3, 64, 64, seed=7)
  query, idx, feat, cosine = _lpt_forward(m, prompts, x)
  apply = _jit(model)
  pr = params["prompt"]
  q = apply({"params": params}, x, pr["shared"])
  _close(q, query)
  nrm = lambda a, axis=-1: a / jnp.linalg.norm(a, axis=axis, keepdims=True)
  sel = jax.lax.top_k(nrm(q) @ nrm(pr["keys"]).T, 2)[1]
  np.testing.assert_array_equal(np.sort(np.asarray(sel), 1), np.sort(idx.numpy(), 1))
  group = pr["group"][sel].mean(axis=1)
  f = apply({"params": params}, x, (pr["shared"], group), prompt_start=(0, -G))
  _close(f, feat)
  _close(nrm(f) @ nrm(params["head"]["kernel"], 0), cosine)


def test_lpt_mismatches_are_readable():
  _, _, sd = _lpt_torch()
  bad = dict(sd)
  del bad["prompt_learner.Prompt_Keys"]
  bad["prompt_learner.Prompt_Tokens_pool"] = torch.zeros(POOL, G, T + 1, D)
  with pytest.raises(WeightMismatchError) as e:
    lpt_ckpt.convert(bad)
  msg = str(e.value)
  assert "missing   prompt_learner.Prompt_Keys" in msg
  assert f"prompt_learner.Prompt_Tokens_pool  model ({POOL}, {G}, {T}, {D}) != file" in msg

  bad = dict(sd)
  bad["prompt_learner.head.weight"] = sd["prompt_learner.head.weight"].T
  with pytest.raises(WeightMismatchError, match=r"stored \(in, out\)"):
    lpt_ckpt.convert(bad)

  bad = {k: v for k, v in sd.items() if k != "blocks.1.attn.proj.bias"}
  with pytest.raises(WeightMismatchError, match=r"missing   blocks.1.attn.proj.bias"):
    lpt_ckpt.convert({"state_dict": bad})
