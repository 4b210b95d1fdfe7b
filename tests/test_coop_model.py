"""CoOp / CoCoOp prompt learners: prompt assembly, EOT, truncation, chunking, parity with a torch
implementation of KaiyangZhou/CoOp trainers/coop.py and trainers/cocoop.py on a tiny random
CLIP in the OpenAI layout, and the trainable counts."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt.coop import model as M
from jaxprompt import tokenizer
from jaxprompt.convert.openai_clip import load_clip

torch = pytest.importorskip("torch")
open_clip_model = pytest.importorskip("open_clip.model")
from torch_fixtures import close, images, nchw, randomise  # noqa: E402

NAMES = ["cat", "golden retriever", "2012 audi tt rs coupe", "sea_or_lake"]
TEXT = dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2)
VISION = dict(layers=1, width=64, patch_size=16, image_size=32)


@pytest.fixture(scope="module")
def tiny():
  torch.manual_seed(0)
  clip = randomise(open_clip_model.CLIP(48, VISION, TEXT, quick_gelu=True), 0)
  model, variables = load_clip({k: v.numpy() for k, v in clip.state_dict().items()})
  return clip, model, variables


def _embed(variables, ids):
  return np.asarray(variables["params"]["txt"]["token_embedding"])[np.asarray(ids)]


@pytest.mark.parametrize("position", M.POSITIONS)
def test_assembly_equals_embedding_of_the_text(tiny, position):
  """Context = the embeddings of four one-token words; the assembled sequence must equal the
  embedding of the tokenised sentence with those words where the context stands."""
  _, _, variables = tiny
  words = ["one", "two", "three", "four"]
  spec = M.PromptSpec(n_ctx=4, class_token_position=position)
  cp = M.build_class_prompts(NAMES, spec, truncate=False)
  ctx = _embed(variables, [tokenizer.encode(w)[0] for w in words])
  got = M.assemble(jnp.asarray(variables["params"]["txt"]["token_embedding"]), jnp.asarray(ctx),
                   jnp.asarray(cp.ids), None if cp.order is None else jnp.asarray(cp.order), 4)
  for c, name in enumerate(NAMES):
    name = name.replace("_", " ")
    if position == "end":
      text = f"one two three four {name}."
    elif position == "middle":
      text = f"one two {name} three four."
    else:
      text = f"{name} one two three four."
    ids = tokenizer.tokenize([text])[0]
    np.testing.assert_array_equal(np.asarray(got[c]), _embed(variables, ids))
    assert cp.eot[c] == int(np.argmax(ids)) == int(np.nonzero(ids == M.EOT_ID)[0][0])


def test_eot_index_and_name_len():
  cp = M.build_class_prompts(["cat", "2012 audi"], M.PromptSpec(n_ctx=16))
  # "cat" -> SOT, 16 X, cat, ".", EOT: EOT at 19 (KaiyangZhou/CoOp's documented example ids).
  assert cp.ids[0, :20].tolist() == [49406] + [343] * 16 + [2368, 269, 49407]
  assert cp.eot.tolist() == [19, 23]  # "2012 audi": 1 + 16 + (4 digits + audi) + "."
  assert cp.name_len.tolist() == [1, 5]
  assert cp.length == 24  # cut after the last EOT
  init = M.build_class_prompts(["cat"], M.PromptSpec(n_ctx=16, ctx_init="a_photo_of_a"))
  assert init.n_ctx == 4 and init.ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269,
                                                          49407]


def test_init_phrase_overrides_n_ctx_and_csc(tiny):
  _, _, variables = tiny
  tok = variables["params"]["txt"]["token_embedding"]
  spec = M.PromptSpec(n_ctx=16, csc=True, ctx_init="a photo of a").resolved()
  assert spec.n_ctx == 4 and not spec.csc
  p = M.init_prompt(jax.random.key(0), spec, width=64, embed_dim=48, token_embedding=tok)
  np.testing.assert_array_equal(np.asarray(p["ctx"]), np.asarray(tok)[[320, 1125, 539, 320]])
  r = M.init_prompt(jax.random.key(0), M.PromptSpec(n_ctx=16), width=512, embed_dim=1024)
  assert abs(float(jnp.std(r["ctx"])) - 0.02) < 1e-3


def test_truncated_equals_full_length(tiny):
  _, model, variables = tiny
  spec = M.PromptSpec(n_ctx=4, class_token_position="middle")
  ctx = M.init_prompt(jax.random.key(1), spec, width=64, embed_dim=48)["ctx"] * 10
  full = M.text_features(model, variables, ctx, M.build_class_prompts(NAMES, spec, truncate=False))
  cut_cp = M.build_class_prompts(NAMES, spec)
  assert cut_cp.length < 77
  cut = M.text_features(model, variables, ctx, cut_cp)
  chunked = M.text_features(model, variables, ctx, cut_cp, chunk=3, remat=True)
  close(cut, full.astype(np.float32).__array__(), 1e-5)
  close(chunked, np.asarray(full), 1e-5)


# --------------------------------------------------------------------------- torch reference


class TorchPromptLearner(torch.nn.Module):
  """CoOp's PromptLearner as the reference writes it (prefix/suffix buffers, per-class loop for
  'middle'/'front'), optionally with CoCoOp's Meta-Net."""

  def __init__(self, clip, classnames, ctx, position="end", meta=None):
    super().__init__()
    m = ctx.shape[-2]
    names = [n.replace("_", " ") for n in classnames]
    self.name_lens = [len(tokenizer.encode(n)) for n in names]
    prefix = " ".join(["X"] * m)
    ids = torch.from_numpy(tokenizer.tokenize([f"{prefix} {n}." for n in names]).astype(np.int64))
    with torch.no_grad():
      emb = clip.token_embedding(ids)
    self.tokenized = ids
    self.prefix, self.suffix = emb[:, :1], emb[:, 1 + m:]
    self.ctx, self.position, self.m, self.meta = ctx, position, m, meta

  def forward(self, ctx=None):
    ctx = self.ctx if ctx is None else ctx
    c = self.prefix.shape[0]
    if ctx.dim() == 2:
      ctx = ctx.unsqueeze(0).expand(c, -1, -1)
    if self.position == "end":
      return torch.cat([self.prefix, ctx, self.suffix], dim=1)
    out = []
    h = self.m // 2
    for i in range(c):
      nl = self.name_lens[i]
      pre, name, post = self.prefix[i:i + 1], self.suffix[i:i + 1, :nl], self.suffix[i:i + 1, nl:]
      if self.position == "middle":
        out.append(torch.cat([pre, ctx[i:i + 1, :h], name, ctx[i:i + 1, h:], post], dim=1))
      else:
        out.append(torch.cat([pre, name, ctx[i:i + 1], post], dim=1))
    return torch.cat(out, dim=0)


def torch_text(clip, prompts, tokenized):
  x = prompts + clip.positional_embedding
  x = clip.transformer(x, attn_mask=clip.attn_mask)
  x = clip.ln_final(x)
  return x[torch.arange(x.shape[0]), tokenized.argmax(-1)] @ clip.text_projection


def torch_coop_logits(clip, pl, x):
  with torch.no_grad():
    f = clip.encode_image(x)
    f = f / f.norm(dim=-1, keepdim=True)
    g = torch_text(clip, pl(), pl.tokenized)
    g = g / g.norm(dim=-1, keepdim=True)
    return clip.logit_scale.exp() * f @ g.t()


def torch_cocoop_logits(clip, pl, x):
  with torch.no_grad():
    f = clip.encode_image(x)
    f = f / f.norm(dim=-1, keepdim=True)
    bias = pl.meta(f)
    rows = []
    for i in range(f.shape[0]):  # the reference loops over images
      g = torch_text(clip, pl(pl.ctx + bias[i:i + 1]), pl.tokenized)
      g = g / g.norm(dim=-1, keepdim=True)
      rows.append(clip.logit_scale.exp() * f[i] @ g.t())
    return torch.stack(rows)


def _with_prompt(variables, prompt):
  return {**variables, "params": {**variables["params"], "prompt": prompt}}


@pytest.mark.parametrize("position,csc", [("end", False), ("middle", False), ("front", True)])
def test_coop_logits_match_torch(tiny, position, csc):
  clip, model, variables = tiny
  spec = M.PromptSpec(n_ctx=3, csc=csc, class_token_position=position)
  prompt = M.init_prompt(jax.random.key(2), spec, width=64, embed_dim=48, num_classes=len(NAMES))
  prompt = jax.tree.map(lambda a: 5 * a, prompt)  # far from zero so the context matters
  x = images(3, 32, 32, seed=1)
  ours = M.logits(model, _with_prompt(variables, prompt), jnp.asarray(x),
                  M.build_class_prompts(NAMES, spec))
  pl = TorchPromptLearner(clip, NAMES, torch.from_numpy(np.array(prompt["ctx"])), position)
  close(ours, torch_coop_logits(clip, pl, nchw(x)), 1e-4)


def test_cocoop_logits_match_torch_and_per_image_loop(tiny):
  clip, model, variables = tiny
  spec = M.PromptSpec(ctx_init="a photo of a", conditional=True)
  prompt = M.init_prompt(jax.random.key(3), spec, width=64, embed_dim=48,
                         token_embedding=variables["params"]["txt"]["token_embedding"])
  prompt["meta_net"] = jax.tree.map(lambda a: 3 * a, prompt["meta_net"])
  meta = torch.nn.Sequential(torch.nn.Linear(48, 3), torch.nn.ReLU(), torch.nn.Linear(3, 64))
  with torch.no_grad():
    for i, name in ((0, "linear1"), (2, "linear2")):
      meta[i].weight.copy_(torch.from_numpy(np.array(prompt["meta_net"][name]["kernel"]).T))
      meta[i].bias.copy_(torch.from_numpy(np.array(prompt["meta_net"][name]["bias"])))
  x = images(3, 32, 32, seed=2)
  cp = M.build_class_prompts(NAMES, spec)
  v = _with_prompt(variables, prompt)
  ours = M.logits(model, v, jnp.asarray(x), cp)
  pl = TorchPromptLearner(clip, NAMES, torch.from_numpy(np.array(prompt["ctx"])), "end", meta)
  close(ours, torch_cocoop_logits(clip, pl, nchw(x)), 1e-4)
  # The vmapped version equals a Python loop over the images, and chunked + remat equals both.
  loop = np.concatenate([np.asarray(M.logits(model, v, jnp.asarray(x[i:i + 1]), cp))
                         for i in range(3)])
  close(ours, loop, 1e-5)
  close(M.logits(model, v, jnp.asarray(x), cp, chunk=3, remat=True), loop, 1e-5)


def test_cocoop_gradient_reaches_prompt_only_and_chunking_is_exact(tiny):
  _, model, variables = tiny
  spec = M.PromptSpec(n_ctx=2, conditional=True)
  prompt = M.init_prompt(jax.random.key(4), spec, width=64, embed_dim=48)
  cp = M.build_class_prompts(NAMES, spec)
  x, y = jnp.asarray(images(2, 32, 32, seed=3)), jnp.asarray([0, 3])

  def loss(p, chunk):
    return M.cross_entropy(M.logits(model, _with_prompt(variables, p), x, cp, chunk=chunk,
                                    remat=bool(chunk)), y)

  g_full = jax.grad(loss)(prompt, 0)
  g_chunk = jax.grad(loss)(prompt, 3)
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_chunk)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert all(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(g_full))


def test_trainable_counts():
  shape = lambda spec, **kw: jax.eval_shape(
      lambda r: M.init_prompt(r, spec, **kw), jax.random.key(0))
  assert M.count(shape(M.PromptSpec(n_ctx=16), width=512, embed_dim=1024)) == 8_192
  assert M.count(shape(M.PromptSpec(n_ctx=4), width=512, embed_dim=512)) == 2_048
  cocoop = shape(M.PromptSpec(n_ctx=4, conditional=True), width=512, embed_dim=512)
  assert M.count(cocoop) == 35_360
  assert M.count(cocoop["meta_net"]["linear1"]) == 16_416
  assert M.count(shape(M.PromptSpec(n_ctx=16, csc=True), width=512, embed_dim=1024,
                       num_classes=10)) == 81_920


def test_mismatch_errors():
  p = {"ctx": np.zeros((16, 512))}
  with pytest.raises(ValueError, match="context length 16"):
    M.check_prompt(p, M.PromptSpec(ctx_init="a photo of a"), width=512, num_classes=5)
  with pytest.raises(ValueError, match="width 512"):
    M.check_prompt(p, M.PromptSpec(n_ctx=16), width=768, num_classes=5)
  with pytest.raises(ValueError, match="class_token_position"):
    M.PromptSpec(class_token_position="start").resolved()
  with pytest.raises(ValueError, match="Meta-Net"):
    M.check_prompt(p, M.PromptSpec(n_ctx=16, conditional=True), width=512, num_classes=5)
