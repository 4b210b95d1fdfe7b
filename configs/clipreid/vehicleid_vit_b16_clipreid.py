"""VehicleID (test size 800), ViT-B/16: CLIP-ReID (stage 1: identity tokens; stage 2: image encoder with ID, triplet and image-to-text losses).

  python launch.py --config configs/clipreid/vehicleid_vit_b16_clipreid.py \
      --config.model.weights=weights/clip_vit_b16.npz \
      --config.data.root=data/vehicleid \
      --workdir runs/vehicleid_vit_b16_clipreid

Paper (R1 / R5, no re-ranking): 85.3 / 97.6. Numbers are from the last epoch, as the
reference reports them.

Weights: OpenAI's ViT-B-16.pt (or its `.npz` from `python -m jaxprompt.convert`).
Evaluate an authors' released checkpoint instead of training:
  python launch.py --config configs/clipreid/vehicleid_vit_b16_clipreid.py --stage eval \
      --config.model.released_checkpoint=PATH.pth --config.data.root=data/vehicleid --workdir runs/vehicleid_vit_b16_clipreid_released
"""
from jaxprompt.clipreid import config as clipreid


def get_config():
  return clipreid.paper_config("vehicleid", "vit_b16", "clipreid")
