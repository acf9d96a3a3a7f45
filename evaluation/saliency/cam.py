"""The CAM family (thesis §1.3.2, eq. 1.3-1.9): each method only says how it weighs the target
layer's feature maps; capture, upsampling and normalisation are the shared mechanism's."""

import torch

from zoo import CAStream

from .core import Explainer, Number, OneOf, forward_batch, normalise_per_image, saliency_method, weighted_map

EPS = 1e-7
ATTENTION_SCORES = ("softmax", "logits")  # the attention method's maps: ours, the authors'


@saliency_method("cam")
def cam(ex: Explainer) -> torch.Tensor:
    """CAM (Zhou et al. 2016): the classifier's weights of the target class (h = identity)."""
    capture = ex.capture()
    classifier = ex.model.get_classifier() if hasattr(ex.model, "get_classifier") else None
    weight = getattr(classifier, "weight", None)
    if weight is None or weight.ndim != 2 or weight.shape[1] != capture.activations.shape[1]:
        raise ValueError(f"cam needs a linear classifier over the {capture.activations.shape[1]} channels of the "
                         f"target layer; {ex.model_name} has none (use a gradient-based method)")
    return torch.einsum("bk,bkhw->bhw", weight[ex.targets], capture.activations)


@saliency_method("gradcam")
def gradcam(ex: Explainer) -> torch.Tensor:
    """Grad-CAM: channel weights are the spatially averaged gradients."""
    capture = ex.capture(gradients=True)
    return weighted_map(capture.activations, capture.gradients.mean((2, 3)))


@saliency_method("gradcampp")
def gradcampp(ex: Explainer) -> torch.Tensor:
    """Grad-CAM++ (eq. 1.5, closed form with gradient powers for an exponential score)."""
    capture = ex.capture(gradients=True)
    grads, acts = capture.gradients, capture.activations
    grads2 = grads.square()
    alpha = grads2 / (2 * grads2 + acts.sum((2, 3), keepdim=True) * grads2 * grads + 1e-6)
    alpha = torch.where(grads != 0, alpha, 0.0)
    return weighted_map(acts, (alpha * grads.relu()).sum((2, 3)))


@saliency_method("xgradcam", "axiomcam")
def xgradcam(ex: Explainer) -> torch.Tensor:
    """XGrad-CAM / Axiom-CAM: gradients weighted by the normalised activations (eq. 1.8)."""
    capture = ex.capture(gradients=True)
    acts = capture.activations
    return weighted_map(acts, (capture.gradients * acts / (acts.sum((2, 3), keepdim=True) + EPS)).sum((2, 3)))


@saliency_method("layercam")
def layercam(ex: Explainer) -> torch.Tensor:
    """Layer-CAM: element-wise positive gradients times activations, summed over channels."""
    capture = ex.capture(gradients=True)
    return (capture.gradients.relu() * capture.activations).sum(1).relu()


@saliency_method("hirescam")
def hirescam(ex: Explainer) -> torch.Tensor:
    """HiRes-CAM: element-wise gradients times activations, summed over channels."""
    capture = ex.capture(gradients=True)
    return (capture.gradients * capture.activations).sum(1).relu()


def _chunks(count: int, size: int):
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


@saliency_method("scorecam", batch_size=Number(1, integer=True))
def scorecam(ex: Explainer, batch_size: int | None = None, amp_dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """Score-CAM (eq. 1.6-1.7): softmax over channels of the target logit of the image masked by each
    channel's upsampled, min-max normalised map. Channels of one image whose maps are equal after
    min-max normalisation (all constant maps, for one) give the same mask: each mask is run once. The masked
    images of all the batch's images go through the model ``batch_size`` at a time (default: 32 on a CPU, on a
    GPU as many as its free memory holds: ``forward_batch``). ``amp_dtype`` runs those forwards under autocast
    (the maps and masks stay in the model's dtype)."""
    capture = ex.capture()
    acts = capture.activations
    batch, channels, height, width = acts.shape
    flat = acts.flatten(2)
    low, high = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
    shapes = torch.where(high > low, (flat - low) / (high - low), 0.0)
    # one sort for the whole batch: the image's index first, so each image keeps its own distinct masks, in the
    # order torch.unique gives them for that image alone (in float64, which holds every index and value exactly)
    image_of = torch.arange(batch, device=acts.device, dtype=torch.float64).repeat_interleave(channels)
    unique, inverse = torch.unique(torch.cat([image_of[:, None], shapes.flatten(0, 1).double()], 1), dim=0,
                                   return_inverse=True)
    rows, masks = unique[:, 0].long(), unique[:, 1:].to(shapes.dtype).view(-1, height, width)
    size = ex.images.shape[-2:]
    batch_size = batch_size or forward_batch(ex.model, ex.images[0], amp_dtype, cpu=32)
    scores = torch.empty(len(masks), dtype=acts.dtype, device=acts.device)
    with ex.autocast(amp_dtype):
        for part in _chunks(len(masks), batch_size):
            masked = ex.images[rows[part]] * normalise_per_image(masks[part], size)[:, None]
            scores[part] = ex.score(ex.logits(masked), rows[part])
    return weighted_map(acts, scores[inverse].view(batch, channels).softmax(1))


@saliency_method("ablationcam", batch_size=Number(1, integer=True))
def ablationcam(ex: Explainer, batch_size: int = 32) -> torch.Tensor:
    """Ablation-CAM (eq. 1.9): ``w_k = (y_c - y_c^k) / y_c`` with channel k of the layer set to zero."""
    capture = ex.capture()
    acts = capture.activations
    batch, channels = acts.shape[:2]
    base = ex.score(capture.logits)
    rows = torch.arange(batch, device=acts.device).repeat_interleave(channels)
    ablated_channel = torch.arange(channels, device=acts.device).repeat(batch)
    ablated_scores = torch.empty(batch * channels, dtype=acts.dtype, device=acts.device)
    for part in _chunks(len(rows), batch_size):
        ablated = acts[rows[part]].clone()
        ablated[torch.arange(len(ablated)), ablated_channel[part]] = 0
        logits = ex.logits_with_layer_output(ex.images[rows[part]], ablated)
        ablated_scores[part] = ex.score(logits, rows[part])
    weights = (base[:, None] - ablated_scores.view(batch, channels)) / (base[:, None] + EPS)
    return weighted_map(acts, weights)


@saliency_method("fakecam")
def fakecam(ex: Explainer) -> torch.Tensor:
    """Fake-CAM (thesis §2.4): ones everywhere but a zero at the top-left pixel, a sanity baseline."""
    maps = torch.ones(len(ex.images), *ex.images.shape[-2:], dtype=ex.images.dtype, device=ex.images.device)
    maps[:, 0, 0] = 0
    return maps


def _castream_scores(ex: Explainer) -> torch.Tensor:
    """The last CA-Stream block's scores before the softmax, ``F_L q_L / sqrt(d_L)`` (thesis eq. 3.1), [B, h, w]:
    its inputs recorded by a hook, then its own ``scores``. For a PROJ->CA block (eq. 3.8) they lack the key bias's
    term ``b_K . q_L / sqrt(d_L)``, the same at every position, which the map's min-max normalisation cancels."""
    if not isinstance(ex.model, CAStream):
        raise ValueError(f"attention scores='logits' needs a CA-Stream model (its last attention's scores before "
                         f"the softmax); the built-in map of {ex.model_name} ({type(ex.model).__name__}) has none: "
                         f"use scores='softmax'")
    block = ex.model.stream.blocks[-1]
    seen = {}
    handle = block.register_forward_hook(lambda module, inputs, output: seen.update(inputs=inputs))
    try:
        ex.model(ex.images)
    finally:
        handle.remove()
    query, features = seen["inputs"]
    return block.scores(query, features).squeeze(1).unflatten(1, features.shape[-2:])


@saliency_method("attention", scores=OneOf(ATTENTION_SCORES))
def attention(ex: Explainer, scores: str = "softmax") -> torch.Tensor:
    """A zoo model's built-in saliency (CA-Stream: the last stage's attention, eq. 3.1), class-agnostic.
    ``scores="logits"`` (CA-Stream only) gives the scores before the softmax instead, the map the authors'
    code returns."""
    if scores == "logits":
        return _castream_scores(ex)
    output = ex.model(ex.images)
    if not hasattr(output, "saliency"):
        raise ValueError(f"attention needs a zoo model with built-in saliency; {ex.model_name} returns "
                         f"{type(output).__name__}")
    return output.saliency
