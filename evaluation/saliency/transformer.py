"""Saliency from a vision transformer's own attention (the transformer baselines of thesis Tables 2.2, 2.4,
2.7): raw attention, attention rollout, Chefer et al.'s gradient-weighted attention (ICCV 2021,
``generic_attention``) and their LRP-based transformer attribution (CVPR 2021, ``tibav``, alias ``chefer``: the
thesis' TIBAV row; its propagation rules are in ``lrp.py``). Each reads the class token's row of a [B, N, N]
matrix, so each explains the class token; all are batched.

Attention probabilities ``A = softmax(q k^T / sqrt(d))`` ``[B, heads, N, N]`` are read from timm's attention
modules (``blocks[i].attn``): for the call, each computes attention explicitly (``fused_attn`` off, since
fused scaled-dot-product attention never forms A) and a hook on its ``attn_drop`` records A; flags and hooks
are restored even when the forward fails. In eval mode ``attn_drop`` is the identity, so A is exact.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .core import Explainer, saliency_method
from .lrp import attention_relevances, recorded_layers
from .tokens import patch_grid


@contextmanager
def recorded_attentions(net: nn.Module, model_name: str, gradients: bool = False) -> Iterator[list[torch.Tensor]]:
    """A list filled with the attention probabilities of every block of ``net``, in order, by the forward
    passes run inside the ``with`` block. With ``gradients`` they take part in autograd (the first block's
    becomes a leaf), so the gradient of the target logits with respect to each can be taken."""
    blocks = getattr(net, "blocks", None)
    attentions = [getattr(block, "attn", None) for block in blocks] if isinstance(blocks, nn.Sequential) else []
    if not attentions or not all(hasattr(attn, "attn_drop") and hasattr(attn, "fused_attn") for attn in attentions):
        raise ValueError(f"{model_name} has no timm attention blocks (blocks[i].attn) to read attention from; "
                         f"rawattention, rollout, generic_attention and tibav (chefer) explain timm ViT / DeiT models")
    fused = [attn.fused_attn for attn in attentions]
    recorded = []

    def record(module, inputs, output):
        if gradients and not output.requires_grad:
            output = output.detach().requires_grad_()
        recorded.append(output)
        return output

    handles = [attn.attn_drop.register_forward_hook(record) for attn in attentions]
    try:
        for attn in attentions:
            attn.fused_attn = False
        yield recorded
    finally:
        for attn, flag in zip(attentions, fused, strict=True):
            attn.fused_attn = flag
        for handle in handles:
            handle.remove()


def attentions_of(ex: Explainer, gradients: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Every block's attention ``[B, heads, N, N]`` on the images and, with ``gradients``, the gradient of
    the target logits with respect to each."""
    with recorded_attentions(ex.network, ex.model_name, gradients) as attentions:
        logits = ex.logits(ex.images)
    ex.resolve_targets(logits)
    grads = list(torch.autograd.grad(ex.score(logits).sum(), attentions)) if gradients else None
    return [a.detach() for a in attentions], grads


def class_token_map(ex: Explainer, matrix: torch.Tensor) -> torch.Tensor:
    """The class token's row (token 0) of ``matrix`` [B, N, N] over the patches, on the patch grid [B, h, w]."""
    if getattr(ex.network, "cls_token", None) is None:
        raise ValueError(f"{ex.model_name} has no class token, whose row rawattention, rollout, generic_attention and "
                         f"tibav show; use a CAM method")
    grid = patch_grid(ex.network, ex.images.shape[-2:], ex.model_name)
    return matrix[:, 0, ex.network.num_prefix_tokens:].unflatten(1, grid)


def rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): ``R = Â_L ... Â_1`` with ``Â_l = (mean_h A_l + I) / 2``,
    rows renormalised to sum to 1 (the residual connection as identity attention); [B, N, N]."""
    eye = torch.eye(attentions[0].shape[-1], dtype=attentions[0].dtype, device=attentions[0].device)
    result = eye.expand_as(attentions[0][:, 0])
    for attention in attentions:
        mixed = (attention.mean(1) + eye) / 2
        result = (mixed / mixed.sum(-1, keepdim=True)) @ result
    return result


def relevance(matrices: list[torch.Tensor], gradients: list[torch.Tensor]) -> torch.Tensor:
    """Chefer et al.'s gradient-weighted aggregation over blocks, [B, N, N]: ``R_0 = I``,
    ``R_l = R_{l-1} + Ā_l R_{l-1}`` (so ``R_L = (I + Ā_L) ... (I + Ā_1)``) with ``Ā_l = mean_h (∇A_l ⊙ M_l)^+``,
    ``∇A_l`` the target logit's gradient with respect to block l's attention. ``M_l = A_l``: "Generic
    attention-model explainability" (ICCV 2021, eq. 5-6 for self-attention); ``M_l = R_{A_l}``, the LRP
    relevance of A_l: "Transformer Interpretability Beyond Attention Visualization" (CVPR 2021)."""
    eye = torch.eye(matrices[0].shape[-1], dtype=matrices[0].dtype, device=matrices[0].device)
    result = eye.expand_as(matrices[0][:, 0])
    for matrix, gradient in zip(matrices, gradients, strict=True):
        result = result + (gradient * matrix).clamp_min(0).mean(1) @ result
    return result


@saliency_method("rawattention", "rawatt")
def raw_attention(ex: Explainer) -> torch.Tensor:
    """Raw attention (Dosovitskiy et al. 2020): the class token's attention in the last block, head mean."""
    attentions, _ = attentions_of(ex)
    return class_token_map(ex, attentions[-1].mean(1))


@saliency_method("rollout")
def attention_rollout(ex: Explainer) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): the class token's row of the product over all blocks."""
    attentions, _ = attentions_of(ex)
    return class_token_map(ex, rollout(attentions))


@saliency_method("generic_attention")
def generic_attention(ex: Explainer) -> torch.Tensor:
    """Chefer et al. 2021, "Generic attention-model explainability" (ICCV): ``relevance`` with the attention
    A itself weighting its gradient; class-specific."""
    attentions, gradients = attentions_of(ex, gradients=True)
    return class_token_map(ex, relevance(attentions, gradients))


@saliency_method("tibav", "chefer")
def tibav(ex: Explainer) -> torch.Tensor:
    """Chefer et al. 2021, "Transformer Interpretability Beyond Attention Visualization" (CVPR; the thesis'
    TIBAV): ``relevance`` with the LRP relevance R_A of each block's attention (``lrp.py``, propagated from the
    one-hot target class at the logits) weighting its gradient; class-specific."""
    with recorded_layers(ex.network, ex.model_name) as layers:
        attentions, gradients = attentions_of(ex, gradients=True)
    return class_token_map(ex, relevance(attention_relevances(ex.network, layers, attentions, ex.targets), gradients))
