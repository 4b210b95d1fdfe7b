"""VeRi-776, ViT-B/16: CLIP-ReID + SIE + OLP (camera x view SIE on the class token, coefficient 1.0, overlapping patches with stride 12).

  python launch.py --config configs/clipreid/veri_vit_b16_sie_olp.py \
      --config.model.weights=weights/clip_vit_b16.npz \
      --config.data.root=data/veri \
      --workdir runs/veri_vit_b16_sie_olp

Paper (mAP / R1, no re-ranking): 84.5 / 97.3. Numbers are from the last epoch, as the
reference reports them.
On VeRi-776 SIE uses camera x view: one row per (camera, viewpoint) pair, 20 x 8 = 160
rows indexed camera * views + view, as the released checkpoint implies.

Weights: OpenAI's ViT-B-16.pt (or its `.npz` from `python -m jaxprompt.convert`).
Evaluate an authors' released checkpoint instead of training:
  python launch.py --config configs/clipreid/veri_vit_b16_sie_olp.py --stage eval \
      --config.model.released_checkpoint=PATH.pth --config.data.root=data/veri --workdir runs/veri_vit_b16_sie_olp_released
"""
from jaxprompt.clipreid import config as clipreid


def get_config():
  return clipreid.paper_config("veri", "vit_b16", "sie_olp")
