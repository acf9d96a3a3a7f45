"""Evaluation: post-hoc saliency methods (``evaluation.saliency``), interpretability metrics
(``evaluation.metrics``), the harness (``zoo-eval``), model cards (``evaluation.model_card``) and publishing
to the Hugging Face Hub (``zoo-publish``). See README.md."""
