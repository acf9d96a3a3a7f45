"""Layer-wise relevance propagation (LRP) through a timm ViT / DeiT, for the transformer attribution of Chefer,
Gur & Wolf 2021, "Transformer Interpretability Beyond Attention Visualization" (CVPR; the thesis' TIBAV).

Relevance starts as the one-hot target class at the logits (value 1) and goes down through every layer; on
the way each block's attention probabilities A collect their relevance R_A. The rules (the paper's §3,
"Relevance and gradients" and "Non parametric relevance propagation"):

- linear layers (head, qkv, proj, fc1, fc2): LRP-αβ with α = 1, β = 0, bias ignored (``linear_relevance``);
- the products A·V and Q·Kᵀ: gradient × input for each operand, each operand's relevance then halved, as the
  authors' implementation does (``product_relevance``);
- additions a + b (the residual connections; distilled DeiT's mean of its two heads): gradient × input, each
  term's relevance rescaled to its share |Σ R_a| / (|Σ R_a| + |Σ R_b|) of Σ R (``addition_relevance``);
- a tensor used twice (a block's input, by the skip and by the branch): the two relevances summed;
- class-token pooling: the relevance goes to token 0 (for distilled DeiT, the distillation head's to token 1).

LayerNorm, GELU, softmax, dropout, LayerScale, drop-path and identity norms pass the relevance unchanged:
a simplification the method makes. Every sum that decides a split is taken per image, so a batch gives each
image its map alone; all is tensor code on the activations' device. Where a rule would divide by zero it
gives zero relevance.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

Recorded = dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]  # a module's input and output in one forward


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b``, zero where ``b`` is zero."""
    return torch.where(b == 0, 0.0, a / b)


def linear_relevance(x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor,
                     alpha: float = 1.0) -> torch.Tensor:
    """LRP-αβ (β = α - 1) from the output of ``x @ weight.T`` back to ``x`` [..., in], the bias ignored (Chefer
    et al. 2021, CVPR, §3, with α = 1, β = 0): the positive contributions z⁺ = x⁺W⁺ᵀ + x⁻W⁻ᵀ share
    ``relevance`` [..., out] as R_x = x⁺ ⊙ (S W⁺) + x⁻ ⊙ (S W⁻), S = R / z⁺, and with β > 0 the negative ones
    z⁻ = x⁺W⁻ᵀ + x⁻W⁺ᵀ take away β times their own share."""
    x_pos, x_neg = x.clamp_min(0), x.clamp_max(0)
    w_pos, w_neg = weight.clamp_min(0), weight.clamp_max(0)

    def shared(w_on_pos: torch.Tensor, w_on_neg: torch.Tensor) -> torch.Tensor:
        s = safe_divide(relevance, F.linear(x_pos, w_on_pos) + F.linear(x_neg, w_on_neg))
        return x_pos * (s @ w_on_pos) + x_neg * (s @ w_on_neg)

    beta = alpha - 1
    positive = shared(w_pos, w_neg)
    return positive if beta == 0 else alpha * positive - beta * shared(w_neg, w_pos)


def product_relevance(x: torch.Tensor, y: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient × input for both operands of ``Z = x @ y`` (Chefer et al. 2021, CVPR, §3, the rule G(u, v, R)):
    R_x = x ⊙ ∂(Z·S)/∂x = x ⊙ (S yᵀ), R_y = y ⊙ (xᵀ S), S = R / Z. Each sums to Σ R where Z ≠ 0; the caller
    halves them. Scaling x by c scales Z by c and S by 1/c, so neither changes: q·d^-½ Kᵀ gives q's relevance."""
    s = safe_divide(relevance, x @ y)
    return x * (s @ y.mT), y * (x.mT @ s)


def addition_relevance(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of ``a + b`` [B, ...] (Chefer et al. 2021, CVPR, §3, the normalisation of R^u and R^v):
    gradient × input R_a = a ⊙ R / (a + b), likewise R_b, then each rescaled so that per image
    Σ R_a = |Σ R_a| / (|Σ R_a| + |Σ R_b|) · Σ R (and likewise Σ R_b): the two sum to Σ R whatever their signs."""
    s = safe_divide(relevance, a + b)
    r_a, r_b = a * s, b * s
    dims = tuple(range(1, relevance.ndim))
    sum_a, sum_b = r_a.sum(dims, keepdim=True), r_b.sum(dims, keepdim=True)
    share = safe_divide(relevance.sum(dims, keepdim=True), sum_a.abs() + sum_b.abs())
    return r_a * sum_a.sign() * share, r_b * sum_b.sign() * share


def unsupported(net: nn.Module) -> str | None:
    """Why the propagation below does not cover ``net``, or None: it knows timm's VisionTransformer (and the
    distilled DeiT) with class-token pooling, pre-norm ``Block``s of ``Attention`` without q/k norms or gate,
    ``Mlp``s of linear layers and linear heads."""
    if not isinstance(net, VisionTransformer):
        return "is not a timm VisionTransformer (ViT / DeiT), whose layers tibav's LRP rules cover"
    if net.cls_token is None:
        return "has no class token, whose attention row tibav shows; use a CAM method"
    if net.global_pool != "token" or net.attn_pool is not None:
        return f"pools its tokens with global_pool={net.global_pool!r}, not by its class token as tibav needs"
    if type(net).forward_head not in (VisionTransformer.forward_head, VisionTransformerDistilled.forward_head) \
            or type(net).forward_features is not VisionTransformer.forward_features:
        return f"is a {type(net).__name__} with its own forward, which tibav's LRP rules do not follow"
    heads = [net.head, getattr(net, "head_dist", None)] if isinstance(net, VisionTransformerDistilled) else [net.head]
    if not all(isinstance(head, nn.Linear) for head in heads):
        return "has no linear classifier head (num_classes=0?) to start tibav's relevance from"
    for i, block in enumerate(net.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            return (f"has a {type(block).__name__} with {type(getattr(block, 'attn', None)).__name__} at blocks[{i}]; "
                    f"tibav's LRP rules cover timm's pre-norm Block with Attention")
        if not (isinstance(block.attn.q_norm, nn.Identity) and isinstance(block.attn.k_norm, nn.Identity)):
            return f"normalises queries and keys (qk_norm) in blocks[{i}], which tibav's LRP rules do not cover"
        if block.attn.gate is not None:
            return f"gates its attention output in blocks[{i}], which tibav's LRP rules do not cover"
        mlp = block.mlp
        if type(mlp) is not Mlp or not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)):
            return f"has a {type(mlp).__name__} MLP at blocks[{i}]; tibav's LRP rules cover timm's Mlp of two Linear"
    return None


@contextmanager
def recorded_layers(net: nn.Module, model_name: str) -> Iterator[Recorded]:
    """The input and output of every module the propagation reads (each block, its qkv, proj, fc1, fc2, ls1,
    ls2; the heads), filled by the forward run inside the ``with`` block, detached; hooks removed after, also
    when the forward fails. A ValueError names the model and the reason when the rules do not cover it."""
    reason = unsupported(net)
    if reason:
        raise ValueError(f"{model_name} {reason}")
    modules = [net.head] + ([net.head_dist] if isinstance(net, VisionTransformerDistilled) else [])
    for block in net.blocks:
        modules += [block, block.ls1, block.ls2, block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2]
    recorded = {}

    def record(module, inputs, output):
        recorded[module] = (inputs[0].detach(), output.detach())

    handles = [module.register_forward_hook(record) for module in modules]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def attention_block_relevance(attn: Attention, layers: Recorded, attention: torch.Tensor,
                              relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance at the input of ``attn`` (its qkv's input) [B, N, C] from ``relevance`` at its output, and
    R_A [B, heads, N, N] of its attention probabilities ``attention``: proj, then A·V (halved), then Q·Kᵀ
    (halved; the softmax passes R_A unchanged), then qkv."""
    relevance = linear_relevance(layers[attn.proj][0], attn.proj.weight, relevance)
    relevance = relevance.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # [B, heads, N, d]
    qkv_input, qkv = layers[attn.qkv]
    q, k, v = qkv.unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4)
    r_attention, r_v = (r / 2 for r in product_relevance(attention, v, relevance))
    r_q, r_kt = (r / 2 for r in product_relevance(q, k.mT, r_attention))
    r_qkv = torch.stack([r_q, r_kt.mT, r_v]).permute(1, 3, 0, 2, 4).flatten(2)  # [B, N, 3 · heads · d]
    return linear_relevance(qkv_input, attn.qkv.weight, r_qkv), r_attention


def block_relevance(block: Block, layers: Recorded, attention: torch.Tensor,
                    relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance at the input x of ``block`` from ``relevance`` at its output, and its attention's R_A. The
    block is h = x + ls1(attn(norm1(x))), out = h + ls2(mlp(norm2(h))); norms, GELU, LayerScale and drop-path
    pass relevance unchanged, the two uses of x (and of h) add their relevances."""
    x, _ = layers[block]
    attn_branch, mlp_branch = layers[block.ls1][1], layers[block.ls2][1]
    r_h, r_mlp = addition_relevance(x + attn_branch, mlp_branch, relevance)
    r_mlp = linear_relevance(layers[block.mlp.fc2][0], block.mlp.fc2.weight, r_mlp)
    r_h = r_h + linear_relevance(layers[block.mlp.fc1][0], block.mlp.fc1.weight, r_mlp)
    r_x, r_attn = addition_relevance(x, attn_branch, r_h)
    r_attn, r_attention = attention_block_relevance(block.attn, layers, attention, r_attn)
    return r_x + r_attn, r_attention


def token_relevance(net: VisionTransformer, layers: Recorded, targets: torch.Tensor) -> torch.Tensor:
    """Relevance [B, N, C] at the last block's output: the one-hot target class at the logits, through the
    head to the class token (fc_norm, the final norm and head dropout pass it unchanged); for distilled DeiT
    the mean of the two heads' logits splits it first by ``addition_relevance``, the distillation head's
    share going to token 1."""
    head_input, logits = layers[net.head]
    relevance = F.one_hot(targets, logits.shape[-1]).to(logits.dtype)
    tokens = torch.zeros_like(layers[net.blocks[-1]][1])
    if isinstance(net, VisionTransformerDistilled):
        dist_input, dist_logits = layers[net.head_dist]
        relevance, r_dist = addition_relevance(logits, dist_logits, relevance)
        tokens[:, 1] = linear_relevance(dist_input, net.head_dist.weight, r_dist)
    tokens[:, 0] = linear_relevance(head_input, net.head.weight, relevance)
    return tokens


def attention_relevances(net: VisionTransformer, layers: Recorded, attentions: list[torch.Tensor],
                         targets: torch.Tensor) -> list[torch.Tensor]:
    """R_A [B, heads, N, N] of every block's attention probabilities ``attentions``, first block to last, for
    the target classes, propagated from the logits down through the recorded forward ``layers``."""
    relevance = token_relevance(net, layers, targets)
    relevances = []
    for block, attention in zip(reversed(net.blocks), reversed(attentions), strict=True):
        relevance, r_attention = block_relevance(block, layers, attention, relevance)
        relevances.append(r_attention)
    return relevances[::-1]
