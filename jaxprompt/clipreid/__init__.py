"""CLIP-ReID (Li et al., AAAI 2023) and its CLIP baseline: recipe, driver, model, data, evaluation."""
