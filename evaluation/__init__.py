"""Post-hoc saliency methods, interpretability metrics, the evaluation harness and model-card
publishing. Not written yet: see the project's issues on saliency methods, the harness and model cards."""
