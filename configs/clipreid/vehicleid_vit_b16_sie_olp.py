"""VehicleID (test size 800), ViT-B/16: CLIP-ReID + SIE + OLP (camera SIE on the class token, coefficient 1.0, overlapping patches with stride 12).

  python launch.py --config configs/clipreid/vehicleid_vit_b16_sie_olp.py \
      --config.model.weights=weights/clip_vit_b16.npz \
      --config.data.root=data/vehicleid \
      --workdir runs/vehicleid_vit_b16_sie_olp

Paper (R1 / R5, no re-ranking): 85.5 / 97.2. Numbers are from the last epoch, as the
reference reports them.

SIE on VehicleID: every training image has camera 0 and every gallery image camera 1 (the
reader's convention, as in the reference), so the camera table has one row and the
reference cannot index it at test time (its gallery lookup fails). The only runnable
reading is to clamp the out-of-range camera to the last row (model.sie_clamp=True, set by
this recipe only): SIE is then a constant offset on the class token for every image.

Weights: OpenAI's ViT-B-16.pt (or its `.npz` from `python -m jaxprompt.convert`).
Evaluate an authors' released checkpoint instead of training:
  python launch.py --config configs/clipreid/vehicleid_vit_b16_sie_olp.py --stage eval \
      --config.model.released_checkpoint=PATH.pth --config.data.root=data/vehicleid --workdir runs/vehicleid_vit_b16_sie_olp_released
"""
from jaxprompt.clipreid import config as clipreid


def get_config():
  return clipreid.paper_config("vehicleid", "vit_b16", "sie_olp")
