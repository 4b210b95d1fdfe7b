"""DukeMTMC-reID, ViT-B/16: CLIP-ReID + SIE + OLP (camera SIE on the class token, coefficient 1.0, overlapping patches with stride 12).

  python launch.py --config configs/clipreid/dukemtmc_vit_b16_sie_olp.py \
      --config.model.weights=weights/clip_vit_b16.npz \
      --config.data.root=data/dukemtmcreid \
      --workdir runs/dukemtmc_vit_b16_sie_olp

Paper (mAP / R1, no re-ranking): 83.1 / 90.8. Numbers are from the last epoch, as the
reference reports them.

Weights: OpenAI's ViT-B-16.pt (or its `.npz` from `python -m jaxprompt.convert`).
Evaluate an authors' released checkpoint instead of training:
  python launch.py --config configs/clipreid/dukemtmc_vit_b16_sie_olp.py --stage eval \
      --config.model.released_checkpoint=PATH.pth --config.data.root=data/dukemtmcreid --workdir runs/dukemtmc_vit_b16_sie_olp_released
"""
from jaxprompt.clipreid import config as clipreid


def get_config():
  return clipreid.paper_config("dukemtmc", "vit_b16", "sie_olp")
