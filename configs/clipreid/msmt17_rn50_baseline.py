"""MSMT17 (V1, train+val), RN50: CLIP-ReID baseline (image encoder fine-tuned with ID + triplet losses, no text stage).

  python launch.py --config configs/clipreid/msmt17_rn50_baseline.py \
      --config.model.weights=weights/clip_rn50.npz \
      --config.data.root=data/msmt17 \
      --workdir runs/msmt17_rn50_baseline

Paper (mAP / R1, no re-ranking): 60.7 / 82.1. Numbers are from the last epoch, as the
reference reports them.

Weights: OpenAI's RN50.pt (or its `.npz` from `python -m jaxprompt.convert`).
Evaluate an authors' released checkpoint instead of training:
  python launch.py --config configs/clipreid/msmt17_rn50_baseline.py --stage eval \
      --config.model.released_checkpoint=PATH.pth --config.data.root=data/msmt17 --workdir runs/msmt17_rn50_baseline_released
"""
from jaxprompt.clipreid import config as clipreid


def get_config():
  return clipreid.paper_config("msmt17", "rn50", "baseline")
