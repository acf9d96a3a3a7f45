"""Evaluation: post-hoc saliency methods (``zoo.evaluation.saliency``), interpretability metrics
(``zoo.evaluation.metrics``), the harness (``zoo-eval``), model cards (``zoo.evaluation.model_card``) and publishing
to the Hugging Face Hub (``zoo-publish``). See README.md."""
