"""Training recipes on Hugging Face Accelerate (CA-Stream on ImageNet / CUB / Pascal VOC, gradient
denoising on CIFAR-100). Not written yet: see the project's issue on training recipes."""
