"""Evaluation: post-hoc saliency methods (``evaluation.saliency``), interpretability metrics
(``evaluation.metrics``); the harness and model-card publishing are still to come. See README.md."""
