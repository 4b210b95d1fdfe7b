"""LPT (Dong et al., ICLR 2023) with its VPT-deep and linear-probe baselines: recipe, drivers, model, data, evaluation."""
