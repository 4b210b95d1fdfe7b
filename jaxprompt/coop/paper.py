"""The published numbers the configs compare against (CoOp IJCV 2022, CoCoOp CVPR 2022).

Base-to-new: CoCoOp Table 1 (ViT-B/16, 16 shots, mean of seeds 1-3). Cross-dataset and domain
generalisation: CoCoOp Tables 2 and 3. Few-shot: CoOp's RN50 curves (M=16, end, unified).
"""
from __future__ import annotations

DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers",
            "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")

# dataset -> (CLIP base, new, H, CoOp base, new, H, CoCoOp base, new, H)
_B2N = {
    "imagenet": (72.43, 68.14, 70.22, 76.47, 67.88, 71.92, 75.98, 70.43, 73.10),
    "caltech101": (96.84, 94.00, 95.40, 98.00, 89.81, 93.73, 97.96, 93.81, 95.84),
    "oxford_pets": (91.17, 97.26, 94.12, 93.67, 95.29, 94.47, 95.20, 97.69, 96.43),
    "stanford_cars": (63.37, 74.89, 68.65, 78.12, 60.40, 68.13, 70.49, 73.59, 72.01),
    "oxford_flowers": (72.08, 77.80, 74.83, 97.60, 59.67, 74.06, 94.87, 71.75, 81.71),
    "food101": (90.10, 91.22, 90.66, 88.33, 82.26, 85.19, 90.70, 91.29, 90.99),
    "fgvc_aircraft": (27.19, 36.29, 31.09, 40.44, 22.30, 28.75, 33.41, 23.71, 27.74),
    "sun397": (69.36, 75.35, 72.23, 80.60, 65.89, 72.51, 79.74, 76.86, 78.27),
    "dtd": (53.24, 59.90, 56.37, 79.44, 41.18, 54.24, 77.01, 56.00, 64.85),
    "eurosat": (56.48, 64.05, 60.03, 92.19, 54.74, 68.69, 87.49, 60.04, 71.21),
    "ucf101": (70.53, 77.50, 73.85, 84.69, 56.05, 67.46, 82.33, 73.45, 77.64),
}
_B2N_COL = {"zeroshot": 0, "coop": 3, "cocoop": 6}

# method -> target -> accuracy (CoCoOp Table 2, source ImageNet 16 shots; Table 3 variants)
TRANSFER = {
    "coop": {"imagenet": 71.51, "caltech101": 93.70, "oxford_pets": 89.14,
             "stanford_cars": 64.51, "oxford_flowers": 68.71, "food101": 85.30,
             "fgvc_aircraft": 18.47, "sun397": 64.15, "dtd": 41.92, "eurosat": 46.39,
             "ucf101": 66.55, "imagenetv2": 64.20, "imagenet_sketch": 47.99, "imagenet_a": 49.71,
             "imagenet_r": 75.21},
    "cocoop": {"imagenet": 71.02, "caltech101": 94.43, "oxford_pets": 90.14,
               "stanford_cars": 65.32, "oxford_flowers": 71.88, "food101": 86.06,
               "fgvc_aircraft": 22.94, "sun397": 67.36, "dtd": 45.73, "eurosat": 45.37,
               "ucf101": 68.21, "imagenetv2": 64.07, "imagenet_sketch": 48.75,
               "imagenet_a": 50.63, "imagenet_r": 76.18},
    "zeroshot": {"imagenet": 66.73, "imagenetv2": 60.83, "imagenet_sketch": 46.15,
                 "imagenet_a": 47.77, "imagenet_r": 73.96},
}

# (backbone, M) -> CoOp on ImageNet, -V2, -Sketch, -A, -R (CoOp IJCV Table 1, robustness to
# distribution shift; source ImageNet 16 shots; M=16 random init, M=4 from "a photo of a")
DG_TARGETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
ROBUSTNESS = {
    ("RN50", 16): (62.95, 55.11, 32.74, 22.12, 54.96),
    ("RN50", 4): (63.33, 55.40, 34.67, 23.06, 56.60),
    ("ViT-B/32", 16): (66.85, 58.08, 40.44, 30.62, 64.45),
    ("ViT-B/16", 16): (71.92, 64.18, 46.71, 48.41, 74.32),
    ("ViT-B/16", 4): (71.73, 64.56, 47.89, 49.93, 77.32),
}

# dataset -> (zero-shot RN50, CoOp 1, 2, 4, 8, 16 shots)
FEWSHOT_RN50 = {
    "imagenet": (58.18, 57.15, 57.81, 59.99, 61.56, 62.95),
    "caltech101": (86.29, 87.53, 87.93, 89.55, 90.21, 91.83),
    "oxford_pets": (85.77, 85.89, 82.64, 86.70, 85.32, 87.01),
    "stanford_cars": (55.61, 55.59, 58.28, 62.62, 68.43, 73.36),
    "oxford_flowers": (66.14, 68.12, 77.51, 86.20, 91.18, 94.51),
    "food101": (77.31, 74.32, 72.49, 73.33, 71.82, 74.67),
    "fgvc_aircraft": (17.28, 9.64, 18.68, 21.87, 26.13, 31.26),
    "sun397": (58.52, 60.29, 59.48, 63.47, 65.52, 69.26),
    "dtd": (42.32, 44.39, 45.15, 53.49, 59.97, 63.58),
    "eurosat": (37.56, 50.63, 61.50, 70.18, 76.73, 83.53),
    "ucf101": (61.46, 61.92, 64.09, 67.03, 71.94, 75.71),
}
SHOTS = (1, 2, 4, 8, 16)


def base2new(method: str, dataset: str) -> dict:
  row = _B2N[dataset]
  i = _B2N_COL[method]
  return {"base": row[i], "new": row[i + 1], "H": row[i + 2]}


def fewshot(method: str, dataset: str, shots: int) -> dict:
  row = FEWSHOT_RN50[dataset]
  if method == "zeroshot":
    return {"acc": row[0]}
  if method == "coop":
    return {"acc": row[1 + SHOTS.index(shots)]}
  return {}


def transfer(method: str, targets) -> dict:
  t = TRANSFER.get(method, {})
  return {k: t[k] for k in ("imagenet", *targets) if k in t}


def robustness(backbone: str, n_ctx: int) -> dict:
  """CoOp's row of the robustness table ({} where the paper has none)."""
  row = ROBUSTNESS.get((backbone, int(n_ctx)))
  return dict(zip(("imagenet", *DG_TARGETS), row)) if row else {}
