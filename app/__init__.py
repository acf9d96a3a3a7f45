"""The explorer (``zoo-app``, an optional extra): every explanation of an image side by side, with its scores.
``explorer`` computes and draws with the library's public API; ``ui`` puts it on a Gradio page."""
