"""The train steps the benchmarks time: jaxprompt's and a PyTorch eager equivalent.

* CLIP-ReID stage 2 (ViT-B/16 or RN50 image tower at 256x128): label-smoothed ID
  cross-entropy on both BNNeck classifiers + batch-hard triplet on the three features
  + image-to-text cross-entropy against fixed text features, Adam. The JAX step is the
  pipeline's own loss (`make_stage2_loss_fn`) under `trainer.train_step`, jitted with
  the state donated; the torch step runs open_clip's visual tower with the same losses
  written in torch (Syliz517/CLIP-ReID loss/softmax_loss.py, loss/triplet_loss.py).
* LPT phase 2 at 224 (frozen ViT-B/16 and shared prompts; group prompts, keys and the
  cosine head trained; A-GCL on a class-balanced and an instance-balanced batch; SGD
  momentum 0.9): the pipeline's loss (`make_loss_fn`) and fused forward, against the
  same algorithm on timm's VisionTransformer (DongSky/LPT's prompt insertion and
  `phase2_test/cb_loss.py`, `phase2_test/loss.py` in torch).

Both sides get the same weights (the torch model's, converted with the library's
loaders), the same batch and the same thread count. The pipeline imports are in one
place, `_pipeline()`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import numpy as np

from benchmarks import common  # noqa: F401  (puts the repository on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

NUM_IDS = 751  # Market-1501's training identities
PLACES_CLASSES = 365


def _pipeline():
  """Everything the benchmarks take from the pipelines (one place to change their paths)."""
  from jaxprompt import trainer  # pylint: disable=import-outside-toplevel
  from jaxprompt.clipreid import config as reid_config  # pylint: disable=import-outside-toplevel
  from jaxprompt.clipreid import context as reid_context  # pylint: disable=import-outside-toplevel
  from jaxprompt.clipreid import train as reid_train  # pylint: disable=import-outside-toplevel
  from jaxprompt.lpt import config as lpt_config  # pylint: disable=import-outside-toplevel
  from jaxprompt.lpt import context as lpt_context  # pylint: disable=import-outside-toplevel
  from jaxprompt.lpt import train as lpt_train  # pylint: disable=import-outside-toplevel
  from jaxprompt.coop import config as coop_config  # pylint: disable=import-outside-toplevel
  from jaxprompt.coop import train as coop_train  # pylint: disable=import-outside-toplevel
  return dict(
      train_step=trainer.train_step,
      reid_config=reid_config.base_config, reid_loss=reid_train.make_stage2_loss_fn,
      reid_rules=reid_train.stage2_rules, reid_head=reid_train.head_module,
      sie_spec=reid_context.SIESpec, feature_dims=reid_train.feature_dims,
      lpt_config=lpt_config.base_config, lpt_loss=lpt_context.make_loss_fn,
      lpt_spec=lpt_context.prompt_spec, lpt_rules=lpt_train.PHASE2_RULES,
      coop_loss=coop_train.make_loss_fn, coop_rules=coop_config.TRAIN_RULES)


@dataclasses.dataclass
class Step:
  """A ready-to-time pair: `jax_step()` and `torch_step()` each run one blocking step."""
  jax_step: Callable[[], Any]
  torch_step: Callable[[], Any]
  flops: float  # XLA's count for the JAX step
  images: int  # images per step
  jax_loss: Callable[[], float]
  torch_loss: Callable[[], float]


def _torch_clip(vit: bool, tiny_vision: dict | None, tiny_text: dict | None = None):
  """open_clip's CLIP with QuickGELU: ViT-B/16 or RN50, or with `tiny_vision` a tiny random one
  of that kind (a tiny text tower too, `tiny_text`), seeded."""
  import open_clip  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  if tiny_vision is None:
    return open_clip.create_model("ViT-B-16-quickgelu" if vit else "RN50-quickgelu")
  return open_clip.model.CLIP(64, tiny_vision, tiny_text, quick_gelu=True)


def _jax_train_step(loss_fn, tx, trainable, frozen, model_state, batch, dtype):
  """Jit `train_step` with the state donated; returns (run, last loss, flops)."""
  p = _pipeline()
  state = dict(params=trainable, model_state=model_state, opt=tx.init(trainable),
               step=jnp.zeros((), jnp.int32))
  step = jax.jit(functools.partial(p["train_step"], loss_fn=loss_fn, tx=tx, dtype=dtype),
                 donate_argnames=("state",))
  rng = jax.random.key(0)
  batch = jax.device_put(batch)
  frozen = jax.device_put(frozen)
  compiled = step.lower(state, frozen, batch, rng).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  holder = {"state": state, "loss": float("nan")}

  def run():
    holder["state"], metrics = compiled(holder["state"], frozen, batch, rng)
    holder["loss"] = metrics["loss"]
    jax.block_until_ready(holder["state"])

  return run, (lambda: float(holder["loss"])), float(cost.get("flops", 0.0))


# ============================================================== CLIP-ReID stage 2


def _torch_reid_losses(torch):
  F = torch.nn.functional

  def ce_ls(logits, labels, eps=0.1):
    logp = F.log_softmax(logits, dim=1)
    t = torch.zeros_like(logp).scatter_(1, labels[:, None], 1)
    t = (1 - eps) * t + eps / logits.shape[1]
    return (-t * logp).mean(0).sum()

  def triplet(feat, labels, margin=0.3):
    x2 = (feat * feat).sum(1, keepdim=True)
    dist = (x2 + x2.t() - 2 * feat @ feat.t()).clamp(min=1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    ap = (dist * same).max(1)[0]
    an = (dist + 1e9 * same).min(1)[0]
    return F.relu(ap - an + margin).mean()

  return ce_ls, triplet


def reid_jax(model, variables, batch: int, *, dtype=jnp.float32, num_ids: int = NUM_IDS,
             size=(256, 128), vit: bool = True) -> dict[str, Any]:
  """The JAX half of the stage-2 pair (also what gpu.py times): the pipeline's loss,
  rules and head on `model`/`variables`, a P x K batch (K = 4), fixed text features."""
  from jaxprompt.optim import split  # pylint: disable=import-outside-toplevel
  p = _pipeline()
  config = p["reid_config"]()
  config.backbone = "vit_b16" if vit else "rn50"
  config.loss.id_weight = 0.25 if vit else 1.0
  head = p["reid_head"](num_ids)
  dims = p["feature_dims"](model, size)
  rs = np.random.RandomState(0)
  text_feats = rs.randn(num_ids, dims["proj"]).astype(np.float32)
  labels = np.repeat(np.arange(batch // 4), 4).astype(np.int32)  # P x K, K = 4
  images = rs.randn(batch, *size, 3).astype(np.float32)
  hv = head.init(jax.random.key(1), jnp.zeros((2, dims["final"])), jnp.zeros((2, dims["proj"])))
  params = {"img": variables["params"]["img"], "head": hv["params"],
            "prompt": {"text_feats": text_feats}}
  stats = {"head": hv["batch_stats"]}
  if "batch_stats" in variables:
    stats["img"] = variables["batch_stats"]["img"]
  trainable, frozen = split(params, p["reid_rules"](config))
  loss_fn = p["reid_loss"](model, head, config, p["sie_spec"](False, False, 0.0, 1))
  jbatch = {"image": images, "pid": labels, "camid": np.zeros(batch, np.int32),
            "viewid": np.zeros(batch, np.int32)}
  run, loss, flops = _jax_train_step(loss_fn, optax.adam(5e-6), trainable, frozen,
                                     {"batch_stats": stats}, jbatch, dtype)
  return dict(run=run, loss=loss, flops=flops, dims=dims, images=images, labels=labels,
              text_feats=text_feats, id_weight=float(config.loss.id_weight))


def reid_step(backbone: str, batch: int, *, dtype=jnp.float32, num_ids: int = NUM_IDS,
              size=(256, 128), tiny: bool = False) -> Step:
  """Stage-2 CLIP-ReID step pair for 'vit_b16' or 'rn50' (`tiny`: a small tower, for tests)."""
  import torch  # pylint: disable=import-outside-toplevel
  from jaxprompt.convert.openai_clip import load_clip  # pylint: disable=import-outside-toplevel
  vit = backbone.startswith("vit")
  vision = (dict(layers=2, width=128, patch_size=16, image_size=64) if vit else
            dict(layers=(1, 1, 1, 1), width=16, image_size=64))
  clip_t = _torch_clip(vit, vision if tiny else None,
                       dict(context_length=8, vocab_size=50, width=64, heads=1, layers=1))
  sd = {k: v.detach().numpy() for k, v in clip_t.state_dict().items()}
  model, variables = load_clip(sd, image_size=size, dtype=dtype,
                               **(dict(patch_stride=16) if vit else dict(last_stride=1)))
  visual = clip_t.visual.train()
  img = variables["params"]["img"]
  if vit:  # the position embedding resized for 256x128, as CLIP-ReID does
    visual.positional_embedding = torch.nn.Parameter(
        torch.from_numpy(np.asarray(img["positional_embedding"])))
  else:  # last stride 1 and the attention-pool embedding for the 16x8 map
    blk = visual.layer4[0]
    blk.avgpool = torch.nn.Identity()
    if blk.downsample is not None:
      blk.downsample[0] = torch.nn.Identity()
    visual.attnpool.positional_embedding = torch.nn.Parameter(
        torch.from_numpy(np.asarray(img["attnpool"]["positional_embedding"])))
  del clip_t.transformer, clip_t.token_embedding  # the text tower is not used in stage 2

  j = reid_jax(model, variables, batch, dtype=dtype, num_ids=num_ids, size=size, vit=vit)
  run_j, loss_j, flops = j["run"], j["loss"], j["flops"]
  dims, images, labels, text_feats = j["dims"], j["images"], j["labels"], j["text_feats"]
  w_id = j["id_weight"]

  # -- torch
  ce_ls, triplet = _torch_reid_losses(torch)

  def features(x):
    if vit:
      t = visual.conv1(x).flatten(2).transpose(1, 2)
      cls = visual.class_embedding.to(t.dtype).expand(t.shape[0], 1, -1)
      t = visual.ln_pre(torch.cat([cls, t], 1) + visual.positional_embedding)
      blocks = visual.transformer.resblocks
      for i, b in enumerate(blocks):
        t = b(t)
        if i == len(blocks) - 2:
          last = t[:, 0]
      final = visual.ln_post(t[:, 0])
      return last, final, final @ visual.proj
    t = visual.layer2(visual.layer1(visual.stem(x)))
    x3 = visual.layer3(t)
    x4 = visual.layer4(x3)
    return x3.mean((2, 3)), x4.mean((2, 3)), visual.attnpool(x4)

  d_final, d_proj = dims["final"], dims["proj"]
  bn, bn_p = torch.nn.BatchNorm1d(d_final), torch.nn.BatchNorm1d(d_proj)
  bn.bias.requires_grad_(False)
  bn_p.bias.requires_grad_(False)
  cls_h = torch.nn.Linear(d_final, num_ids, bias=False)
  cls_p = torch.nn.Linear(d_proj, num_ids, bias=False)
  for m in (cls_h, cls_p):
    torch.nn.init.normal_(m.weight, std=0.001)
  modules = [visual, bn, bn_p, cls_h, cls_p]
  train_params = [q for m in modules for q in m.parameters() if q.requires_grad]
  opt = torch.optim.Adam(train_params, lr=5e-6)
  x_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  y_t = torch.from_numpy(labels).long()
  text_t = torch.from_numpy(text_feats)
  holder = {"loss": float("nan")}

  def run_t():
    opt.zero_grad(set_to_none=True)
    last, final, proj = features(x_t)
    l_id = ce_ls(cls_h(bn(final)), y_t) + ce_ls(cls_p(bn_p(proj)), y_t)
    l_tri = triplet(last, y_t) + triplet(final, y_t) + triplet(proj, y_t)
    l_i2t = ce_ls(proj @ text_t.t(), y_t)
    loss = w_id * l_id + l_tri + l_i2t
    loss.backward()
    opt.step()
    holder["loss"] = float(loss.detach())

  return Step(run_j, run_t, flops, batch, loss_j, lambda: holder["loss"])


# ============================================================== LPT phase 2


def _torch_agcl(torch, counts, margin=0.1, scale=20.0, noise_mul=0.5, noise_std=1 / 3,
                smoothing=0.1):
  log_n = torch.log(torch.as_tensor(counts, dtype=torch.float32))
  delta = log_n.max() - log_n
  cloud_scale = delta / delta.max()

  def agcl(cosine, labels, gamma_pos, gamma_neg):
    noise = torch.randn_like(cosine) * noise_std
    onehot = torch.nn.functional.one_hot(labels, cosine.shape[1]).float()
    z = scale * (cosine - noise_mul * noise.clamp(-1, 1).abs() * cloud_scale - margin * onehot)
    logp = torch.log_softmax(z, 1)
    p = logp.exp()
    w = torch.where(onehot.bool(), (1 - p).pow(gamma_pos), p.pow(gamma_neg))
    t = (1 - smoothing) * onehot + smoothing / cosine.shape[1]
    return -(t * w * logp).sum(1).mean()

  return agcl


def lpt_jax(vit, img_params, batch: int, *, dtype=jnp.float32, image: int = 224,
            num_classes: int = PLACES_CLASSES) -> dict[str, Any]:
  """The JAX half of the LPT pair (also what gpu.py times): the pipeline's phase-2 loss
  and rules, fused forward, `batch` CB + `batch` IB images, Places-LT's class profile."""
  from jaxprompt.lpt import model as lpt_model  # pylint: disable=import-outside-toplevel
  from jaxprompt.optim import split  # pylint: disable=import-outside-toplevel
  p = _pipeline()
  depth = vit.config.depth
  config = p["lpt_config"]("lpt")
  config.model.group_layers = depth // 2
  spec = p["lpt_spec"](config, num_classes)
  rs = np.random.RandomState(0)
  counts = np.maximum(1, (4980 * np.power(5 / 4980, np.arange(num_classes) / (num_classes - 1)))
                      ).astype(np.int64)  # Places-LT's 4980..5 profile
  params = {"img": img_params,
            **jax.device_get(lpt_model.init_trainables(jax.random.key(0), vit.config, spec))}
  trainable, frozen = split(params, p["lpt_rules"])

  def forward(prm, images, rng):
    return lpt_model.phase2_forward(vit, prm, images, spec, rng=rng, fused=True)

  loss_fn = p["lpt_loss"](config, forward, counts)
  cb_x = rs.randn(batch, image, image, 3).astype(np.float32)
  ib_x = rs.randn(batch, image, image, 3).astype(np.float32)
  cb_y = rs.randint(0, num_classes, batch).astype(np.int32)
  ib_y = rs.randint(0, num_classes, batch).astype(np.int32)
  jbatch = {"cb": {"image": cb_x, "label": cb_y}, "ib": {"image": ib_x, "label": ib_y},
            "ib_weight": np.full((batch,), 0.5, np.float32)}
  run, loss, flops = _jax_train_step(loss_fn, optax.sgd(0.02, momentum=0.9), trainable,
                                     frozen, {}, jbatch, dtype)
  return dict(run=run, loss=loss, flops=flops, spec=spec, params=params, counts=counts,
              cb_x=cb_x, ib_x=ib_x, cb_y=cb_y, ib_y=ib_y)


def lpt_step(batch: int, *, dtype=jnp.float32, image: int = 224, tiny: bool = False,
             num_classes: int = PLACES_CLASSES) -> Step:
  """LPT phase-2 step pair; `batch` images in each of the two (CB, IB) halves."""
  import timm.models.vision_transformer as timm_vit  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from jaxprompt.convert.timm_vit import load_vit  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  width, depth = (64, 4) if tiny else (768, 12)
  m_t = timm_vit.VisionTransformer(
      img_size=image, patch_size=16, embed_dim=width, depth=depth, num_heads=max(1, width // 64),
      num_classes=0, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5)).train()
  for q in m_t.parameters():
    q.requires_grad_(False)
  sd = {k: v.detach().numpy() for k, v in m_t.state_dict().items()}
  model, variables = load_vit(sd, ln_eps=1e-5, dtype=dtype)
  vit = model.img
  j = lpt_jax(vit, variables["params"]["img"], batch, dtype=dtype, image=image,
              num_classes=num_classes)
  run_j, loss_j, flops = j["run"], j["loss"], j["flops"]
  spec, params, counts = j["spec"], j["params"], j["counts"]
  cb_x, ib_x, cb_y, ib_y = j["cb_x"], j["ib_x"], j["cb_y"], j["ib_y"]

  # -- torch: the same fused algorithm on timm's blocks
  pr = jax.device_get(params["prompt"])
  shared = torch.from_numpy(np.asarray(pr["shared"]))
  group = torch.nn.Parameter(torch.from_numpy(np.asarray(pr["group"])))
  keys = torch.nn.Parameter(torch.from_numpy(np.asarray(pr["keys"])))
  kernel = torch.nn.Parameter(torch.from_numpy(np.asarray(params["head"]["kernel"])))
  opt = torch.optim.SGD([group, keys, kernel], lr=0.02, momentum=0.9)
  agcl = _torch_agcl(torch, counts)
  split_at = depth - spec.group_layers
  F = torch.nn.functional

  def blocks(x, start, stop, extra=None):
    n = x.shape[1]
    for i in range(start, stop):
      parts = [x, shared[i].expand(x.shape[0], -1, -1)]
      if extra is not None:
        parts.append(extra[:, i - split_at])
      x = m_t.blocks[i](torch.cat(parts, 1))[:, :n]
    return x

  x_all = torch.from_numpy(np.concatenate([cb_x, ib_x])).permute(0, 3, 1, 2).contiguous()
  y_cb, y_ib = torch.from_numpy(cb_y).long(), torch.from_numpy(ib_y).long()
  holder = {"loss": float("nan")}

  def run_t():
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      h = blocks(m_t._pos_embed(m_t.patch_embed(x_all)), 0, split_at)
      query = m_t.norm(blocks(h, split_at, depth)[:, 0])
    sim = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).t()
    idx = sim.detach().topk(spec.top_k, dim=1).indices
    chosen = group[idx].mean(1)  # (2B, G, T, D)
    feat = m_t.norm(blocks(h, split_at, depth, chosen)[:, 0])
    feat = F.dropout(feat, spec.dropout, training=True)
    cos = F.normalize(feat, dim=-1) @ F.normalize(kernel, dim=0)
    rsim = sim.gather(1, idx)
    b = batch
    l_cb = agcl(cos[:b], y_cb, 0.0, 4.0) - 0.5 * rsim[:b].sum() / b
    l_ib = agcl(cos[b:], y_ib, 0.5, 8.0) - 0.5 * rsim[b:].sum() / b
    loss = l_cb + 0.5 * l_ib
    loss.backward()
    opt.step()
    holder["loss"] = float(loss.detach())

  return Step(run_j, run_t, flops, 2 * batch, loss_j, lambda: holder["loss"])


# ============================================================== CoOp / CoCoOp

# EuroSAT's ten classes (KaiyangZhou/CoOp datasets/eurosat.py NEW_CNAMES): a small class list
# keeps the reference's full-length text passes within the benchmark's time.
EUROSAT = ("Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road",
           "Industrial Buildings", "Pasture Land", "Permanent Crop Land", "Residential Buildings",
           "River", "Sea or Lake")


def coop_step(batch: int, *, conditional: bool = False, dtype=jnp.float32, tiny: bool = False,
              classnames=EUROSAT) -> Step:
  """CoOp (RN50, 16 context tokens) or CoCoOp (ViT-B/16, "a photo of a" + Meta-Net) step pair:
  frozen CLIP at 224, the prompt subtree trained by SGD (momentum 0.9, coupled decay 5e-4).

  The JAX side is the pipeline's forward (`coop.model.logits`: sequences cut after the last
  EOT, CoCoOp's per-image text pass vmapped) under `trainer.train_step`; the torch side is the
  reference's (KaiyangZhou/CoOp trainers/coop.py, trainers/cocoop.py): prompts from the
  prefix/suffix token embeddings at the full 77 tokens, CoCoOp looping over the images.
  """
  import torch  # pylint: disable=import-outside-toplevel
  from jaxprompt import optim, tokenizer  # pylint: disable=import-outside-toplevel
  from jaxprompt.convert.openai_clip import load_clip  # pylint: disable=import-outside-toplevel
  from jaxprompt.coop import model as M  # pylint: disable=import-outside-toplevel
  p = _pipeline()
  vision = (dict(layers=1, width=64, patch_size=16, image_size=32) if conditional else
            dict(layers=(1, 1, 1, 1), width=16, image_size=32))
  clip_t = _torch_clip(conditional, vision if tiny else None,
                       dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))
  clip_t = clip_t.eval()  # CLIP stays in eval mode (Dassl toggles only the prompt learner)
  for q in clip_t.parameters():
    q.requires_grad_(False)
  sd = {k: v.detach().numpy() for k, v in clip_t.state_dict().items()}
  model, variables = load_clip(sd, dtype=dtype)
  size = int(model.config.input_size[0])
  spec = (M.PromptSpec(ctx_init="a photo of a", conditional=True) if conditional else
          M.PromptSpec(n_ctx=16)).resolved()
  cp = M.build_class_prompts(classnames, spec)
  prompt = jax.device_get(M.init_prompt(
      jax.random.key(0), spec, width=model.config.text_width, embed_dim=model.config.embed_dim,
      token_embedding=variables["params"]["txt"]["token_embedding"]))
  params = {**variables["params"], "prompt": prompt}
  trainable, frozen = optim.split(params, optim.rules_from_config(p["coop_rules"]))
  model_state = {k: v for k, v in variables.items() if k != "params"}

  rs = np.random.RandomState(0)
  images = rs.randn(batch, size, size, 3).astype(np.float32)
  labels = rs.randint(0, len(classnames), batch).astype(np.int32)
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.002, momentum=0.9))
  run_j, loss_j, flops = _jax_train_step(p["coop_loss"](model, cp), tx, trainable,
                                         frozen, model_state,
                                         {"image": images, "label": labels}, dtype)

  # -- torch: the reference's prompt learner and text encoder on open_clip's CLIP
  m = spec.n_ctx
  names = [M.clean_name(n) for n in classnames]
  ids = torch.from_numpy(tokenizer.tokenize(
      [f"{M.placeholder_prefix(spec)} {n}." for n in names]).astype(np.int64))
  with torch.no_grad():
    emb = clip_t.token_embedding(ids)
  prefix, suffix, eot = emb[:, :1], emb[:, 1 + m:], ids.argmax(-1)
  ctx = torch.nn.Parameter(torch.from_numpy(np.array(prompt["ctx"])))
  train_params = [ctx]
  meta = None
  if conditional:
    e, h = model.config.embed_dim, model.config.embed_dim // 16
    meta = torch.nn.Sequential(torch.nn.Linear(e, h), torch.nn.ReLU(),
                               torch.nn.Linear(h, model.config.text_width))
    with torch.no_grad():
      for i, name in ((0, "linear1"), (2, "linear2")):
        meta[i].weight.copy_(torch.from_numpy(np.array(prompt["meta_net"][name]["kernel"]).T))
        meta[i].bias.copy_(torch.from_numpy(np.array(prompt["meta_net"][name]["bias"])))
    train_params += list(meta.parameters())
  opt = torch.optim.SGD(train_params, lr=0.002, momentum=0.9, weight_decay=5e-4)
  scale = clip_t.logit_scale.exp()
  x_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  y_t = torch.from_numpy(labels).long()
  holder = {"loss": float("nan")}

  def text(c):  # (M, D) context -> (C, E) normalised class features
    prompts = torch.cat([prefix, c.unsqueeze(0).expand(len(names), -1, -1), suffix], dim=1)
    t = clip_t.transformer(prompts + clip_t.positional_embedding, attn_mask=clip_t.attn_mask)
    g = clip_t.ln_final(t)[torch.arange(len(names)), eot] @ clip_t.text_projection
    return g / g.norm(dim=-1, keepdim=True)

  def run_t():
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      f = clip_t.encode_image(x_t)
      f = f / f.norm(dim=-1, keepdim=True)
    if meta is None:
      lg = scale * f @ text(ctx).t()
    else:
      bias = meta(f)
      lg = torch.stack([scale * text(ctx + bias[i]) @ f[i] for i in range(batch)])
    loss = torch.nn.functional.cross_entropy(lg, y_t)
    loss.backward()
    opt.step()
    holder["loss"] = float(loss.detach())

  return Step(run_j, run_t, flops, batch, loss_j, lambda: holder["loss"])


# ============================================================== reference matmul rate


def matmul_rates(n: int = 2048, rounds: int = 3) -> dict[str, float]:
  """FLOP/s of an n x n float32 matmul in XLA and in torch, interleaved."""
  import torch  # pylint: disable=import-outside-toplevel
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  at = torch.randn(n, n)
  times = common.interleaved({"jax": lambda: mm(a).block_until_ready(),
                              "torch": lambda: at @ at}, rounds=rounds)
  flops = 2.0 * n ** 3
  import statistics  # pylint: disable=import-outside-toplevel
  return {k: flops / statistics.median(v) for k, v in times.items()}
