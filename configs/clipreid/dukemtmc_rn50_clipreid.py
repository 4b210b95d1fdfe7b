"""DukeMTMC-reID, RN50: CLIP-ReID (stage 1: identity tokens; stage 2: image encoder with ID, triplet and image-to-text losses).

  python launch.py --config configs/clipreid/dukemtmc_rn50_clipreid.py \
      --config.model.weights=weights/clip_rn50.npz \
      --config.data.root=data/dukemtmcreid \
      --workdir runs/dukemtmc_rn50_clipreid

Paper (mAP / R1, no re-ranking): 80.7 / 90.0. Numbers are from the last epoch, as the
reference reports them.

Weights: OpenAI's RN50.pt (or its `.npz` from `python -m jaxprompt.convert`).
Evaluate an authors' released checkpoint instead of training:
  python launch.py --config configs/clipreid/dukemtmc_rn50_clipreid.py --stage eval \
      --config.model.released_checkpoint=PATH.pth --config.data.root=data/dukemtmcreid --workdir runs/dukemtmc_rn50_clipreid_released
"""
from jaxprompt.clipreid import config as clipreid


def get_config():
  return clipreid.paper_config("dukemtmc", "rn50", "clipreid")
