"""Tiny torch reference models and comparison helpers shared by the parity tests.

`randomise`, `resize_pos`, `images`, `nchw` and `close` serve every torch parity test.
The rest builds tiny models saved under the authors' names:
CLIP-ReID (Syliz517/CLIP-ReID `make_model_clipreid.py`): `image_encoder.*` (CLIP's
visual tower with the position embedding resized to the training grid),
`text_encoder.*`, `prompt_learner.{cls_ctx, token_prefix, token_suffix}`,
`bottleneck[_proj].*`, `classifier[_proj].weight`, `cv_embed` with SIE.
LPT (DongSky/LPT `PromptModels_pool*/structure.py`): the timm ViT at the top level plus
`prompt_learner.{Prompt_Tokens, Prompt_Tokens_pool, Prompt_Keys, head.weight}`.

Import only from tests that already `pytest.importorskip` torch, open_clip and timm.
"""
from __future__ import annotations

import copy

import numpy as np
import torch


def randomise(model, seed: int):
  """Non-trivial norms, biases and BN statistics (defaults would hide layout bugs)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
      if not p.dtype.is_floating_point or name.endswith("attn_mask") or name == "logit_scale":
        continue
      if name.endswith("running_var"):
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      elif name.endswith(("running_mean", "bias")):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1 and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
  return model.eval()


def images(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
  """Random NHWC float32 images."""
  return np.random.RandomState(seed).randn(b, h, w, 3).astype(np.float32)


def nchw(x: np.ndarray):
  """NHWC numpy -> NCHW torch tensor."""
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def close(ours, ref, tol: float = 1e-4) -> None:
  """Max abs difference of `ours` (jax/numpy) and `ref` (torch/numpy) within `tol`."""
  ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
  ours = np.asarray(ours, np.float32)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  err = float(np.abs(ours - ref).max())
  assert err <= tol, f"max abs diff {err} > {tol} (reference scale {np.abs(ref).max():.3g})"


def resize_pos(pe, grid):
  """CLIP-ReID's `resize_pos_embed`: row 0 kept, bilinear (align_corners=False) on the rest."""
  g = round((pe.shape[0] - 1) ** 0.5)
  rest = pe[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
  rest = torch.nn.functional.interpolate(rest, size=grid, mode="bilinear", align_corners=False)
  return torch.cat([pe[:1], rest.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


def heads(in_planes: int, proj_dim: int, seed: int, num_ids: int = 5) -> dict:
  """BNNecks (bias 0, as the reference keeps it) and bias-free classifiers."""
  torch.manual_seed(seed)
  mods = {"bottleneck": torch.nn.BatchNorm1d(in_planes),
          "bottleneck_proj": torch.nn.BatchNorm1d(proj_dim),
          "classifier": torch.nn.Linear(in_planes, num_ids, bias=False),
          "classifier_proj": torch.nn.Linear(proj_dim, num_ids, bias=False)}
  for m in mods.values():
    randomise(m, seed)
  for bn in ("bottleneck", "bottleneck_proj"):
    torch.nn.init.zeros_(mods[bn].bias)
  return mods


def clipreid_vit_state_dict(*, image_size, stride: int, num_ids: int, num_cams: int = 0,
                            width: int = 64, layers: int = 2, patch: int = 16,
                            embed_dim: int = 32, text_width: int = 64, text_layers: int = 1,
                            sie_std: float = 0.5, seed: int = 0) -> tuple[dict, dict]:
  """A random CLIP-ReID ViT state dict (torch tensors) trained "at" `image_size` / `stride`,
  with a camera SIE table of `num_cams` rows (N(0, sie_std)) when `num_cams > 0`.

  Returns (state_dict, parts) with parts {'clip', 'visual', 'heads', 'grid'}.
  """
  from jaxprompt.clipreid.model import TEMPLATES  # pylint: disable=import-outside-toplevel
  from jaxprompt.tokenizer import tokenize  # pylint: disable=import-outside-toplevel
  import open_clip.model as open_clip_model  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  vision = dict(layers=layers, width=width, patch_size=patch, image_size=4 * patch)
  text = dict(context_length=77, vocab_size=49408, width=text_width, heads=text_width // 64,
              layers=text_layers)
  clip = randomise(open_clip_model.CLIP(embed_dim, vision, text, quick_gelu=True), seed)
  visual = copy.deepcopy(clip.visual)
  h, w = image_size
  grid = ((h - patch) // stride + 1, (w - patch) // stride + 1)
  visual.conv1.stride = (stride, stride)
  with torch.no_grad():
    visual.positional_embedding = torch.nn.Parameter(
        resize_pos(visual.positional_embedding, grid))
  mods = heads(width, embed_dim, seed + 1, num_ids)
  g = torch.Generator().manual_seed(seed + 2)
  ids = torch.from_numpy(tokenize([TEMPLATES["person"]]).astype(np.int64))
  with torch.no_grad():
    emb = clip.token_embedding(ids)
  sd = {f"image_encoder.{k}": v for k, v in visual.state_dict().items()}
  for k, v in clip.state_dict().items():
    if k.startswith(("transformer.", "ln_final.")) or k in ("positional_embedding",
                                                            "text_projection"):
      sd[f"text_encoder.{k}"] = v
  sd.update({"prompt_learner.cls_ctx": 0.02 * torch.randn(num_ids, 4, text_width, generator=g),
             "prompt_learner.token_prefix": emb[:, :5],
             "prompt_learner.token_suffix": emb[:, 9:]})
  if num_cams:
    # The default is large enough to move the features visibly (the reference's lambda is
    # 1 or 3); the reference initialises it at 0.02.
    sd["cv_embed"] = sie_std * torch.randn(num_cams, width, generator=g)
  for name, m in mods.items():
    sd.update({f"{name}.{k}": v for k, v in m.state_dict().items()})
  return sd, dict(clip=clip, visual=visual, heads=mods, grid=grid)


def lpt_torch(seed: int = 0, *, depth: int = 4, prompt_length: int = 3, pool: int = 5,
              group_layers: int = 2, num_classes: int = 7, width: int = 128,
              img_size: int = 64, patch: int = 16, heads: int = 2):
  """A random LPT phase-2 model: (timm ViT, prompt tensors, full state dict)."""
  import timm.models.vision_transformer as timm_vit_mod  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  # LPT builds the timm ViT with nn.LayerNorm (eps 1e-5) and nn.GELU; its timm head is identity.
  m = timm_vit_mod.VisionTransformer(img_size=img_size, patch_size=patch, embed_dim=width,
                                     depth=depth, num_heads=heads, num_classes=0,
                                     norm_layer=torch.nn.LayerNorm).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
        p.copy_(1 + 0.3 * torch.randn_like(p))
      elif "mlp.fc2.weight" in name:
        p.normal_(0, 0.5)
      else:
        p.normal_(0, 0.3)
  g = torch.Generator().manual_seed(seed + 1)
  t, d = prompt_length, width
  prompts = {"Prompt_Tokens": 0.5 * torch.randn(depth, t, d, generator=g),
             "Prompt_Tokens_pool": 0.5 * torch.randn(pool, group_layers, t, d, generator=g),
             "Prompt_Keys": torch.randn(pool, d, generator=g),
             "head.weight": torch.randn(d, num_classes, generator=g)}
  sd = dict(m.state_dict())
  sd.update({f"prompt_learner.{k}": v for k, v in prompts.items()})
  return m, prompts, sd
