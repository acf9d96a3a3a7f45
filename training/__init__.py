"""Training recipes on Hugging Face Accelerate: CA-Stream on ImageNet, CUB-200-2011 and Pascal VOC 2012 over
a fine-tuned GAP baseline, and gradient denoising on CIFAR-100 (``zoo-train <recipe>``; see training/README.md).
"""
