"""The mechanism every saliency method shares: one call's model state, target layer, targets,
captured activations and gradients, and the map's final upsampling and normalisation.

A method is a function ``method(ex: Explainer, **options) -> Tensor`` registered with
``@saliency_method(name, **limits)`` (``limits``: the allowed values of its options, ``Number`` or ``OneOf``);
it returns a raw map ``[B, h, w]`` (at the layer's or the input's resolution) and ``explain`` turns it into
``[B, H, W]`` in [0, 1]; a method registered with ``final=True`` returns that final map itself.
"""

import inspect
import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import nn

from zoo import PooledBackbone
from zoo.output import check_image_batch, checked_inputs, logits_of, model_name

from .tokens import has_patch_grid, layer_layout, patch_grid

__all__ = ["METHODS", "Explainer", "Number", "OneOf", "autocast", "batch_from_memory", "check_options", "default_layer",
           "explain", "forward_batch", "mask_images", "min_max", "normalise_per_image", "pixel_statistics",
           "saliency_method"]

METHODS: dict[str, Callable[..., torch.Tensor]] = {}
_ALIASES: dict[str, str] = {}
_LIMITS: dict[str, dict] = {}
_FINAL: set[Callable] = set()  # methods whose maps are final: at the input size, in [0, 1]
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Number:
    """A numeric option's allowed values: finite, at least ``low`` (above it when ``strict``), whole when
    ``integer``."""

    low: float
    strict: bool = False
    integer: bool = False

    def allows(self, value) -> bool:
        kinds = int if self.integer else int | float
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            return False
        return value > self.low if self.strict else value >= self.low

    def __str__(self) -> str:
        return f"{'an integer' if self.integer else 'a number'} {'>' if self.strict else '>='} {self.low:g}"


@dataclass(frozen=True)
class OneOf:
    """An option that takes one of ``choices``."""

    choices: tuple

    def allows(self, value) -> bool:
        return value in self.choices

    def __str__(self) -> str:
        return "one of " + ", ".join(map(repr, self.choices))


def saliency_method(name: str, *aliases: str, final: bool = False, **limits: Number | OneOf):
    """Register ``fn(ex, **options)`` under ``name`` (and aliases) in ``METHODS``; ``limits`` are the allowed
    values of its options, checked by ``check_options`` (an option whose default is None may also be None).
    ``final``: its maps are already at the input size and in [0, 1], and ``explain`` leaves them as they are."""
    def register(fn):
        METHODS[name] = fn
        _LIMITS[name] = limits
        if final:
            _FINAL.add(fn)
        for alias in aliases:
            METHODS[alias] = fn
            _ALIASES[alias] = name
        return fn
    return register


def check_options(method: str, options: dict) -> None:
    """Refuse an unknown method, an option it does not take, or an option's value outside its limits, with a
    ValueError naming the method and the option."""
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}; known: {', '.join(sorted(METHODS))}")
    name = _ALIASES.get(method, method)
    parameters = dict(list(inspect.signature(METHODS[method]).parameters.items())[1:])
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise ValueError(f"{name} takes no option {', '.join(unknown)} "
                         f"(its options: {', '.join(parameters) or 'none'})")
    for option, value in options.items():
        limit = _LIMITS[name].get(option)
        if limit is None or limit.allows(value) or (value is None and parameters[option].default is None):
            continue
        raise ValueError(f"{name} {option} must be {limit}, got {value!r}")


def backbone_of(model: nn.Module) -> nn.Module:
    """The network whose layers are explained: a pooling model's backbone (CA-Stream, SimPool), any other model
    itself."""
    return model.backbone if isinstance(model, PooledBackbone) else model


def default_layer(model: nn.Module) -> nn.Module:
    """The layer CAM methods explain by default (thesis §2.5.1): a ResNet's last block, a ViT / DeiT's last
    block's first norm (``blocks[-1].norm1``), a VGG's last convolution before the last max-pool (its
    rectified output), a ConvNeXt's or MambaOut's last stage, any other timm model's last feature stage
    (``feature_info``: Swin's last stage, Hiera's last block); for a CA-Stream or SimPool model, that layer of its
    backbone."""
    net = backbone_of(model)
    if hasattr(net, "layer4"):  # timm and torchvision ResNets
        return net.layer4[-1]
    if hasattr(net, "num_prefix_tokens") and hasattr(net, "blocks") and hasattr(net.blocks[-1], "norm1"):  # timm ViTs
        return net.blocks[-1].norm1
    if hasattr(net, "stages"):  # timm ConvNeXt and other staged timm models
        return net.stages[-1]
    if hasattr(net, "features") and isinstance(net.features, nn.Sequential):  # VGG, torchvision ConvNeXt, ...
        return net.features[-2] if isinstance(net.features[-1], nn.MaxPool2d) else net.features[-1]
    feature_info = getattr(net, "feature_info", None)
    if feature_info:
        info = feature_info[-1] if isinstance(feature_info, list) else feature_info.info[-1]
        return net.get_submodule(info["module"])
    raise ValueError(f"no default layer for a {type(model).__name__}: pass layer= (a module or its dotted name)")


def _resolve_layer(model: nn.Module, layer: nn.Module | str | None) -> nn.Module:
    """The module ``layer`` names: itself, a dotted name in ``model`` or, for a CA-Stream or SimPool model, one in its
    backbone (``layer3.1`` as for the plain timm network, where ``model`` has none of that name)."""
    if layer is None:
        return default_layer(model)
    if isinstance(layer, nn.Module):
        if not any(module is layer for module in model.modules()):
            raise ValueError(f"layer {type(layer).__name__} is not a module of this {type(model).__name__}")
        return layer
    for net in (model, backbone_of(model)):
        try:
            return net.get_submodule(layer)
        except AttributeError:
            pass
    children = ", ".join(name for name, _ in model.named_children())
    raise ValueError(f"{type(model).__name__} has no layer {layer!r} (its top-level modules: {children})")


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block; every module's own train/eval mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def _explaining(model: nn.Module) -> Iterator[None]:
    """Eval mode, no parameter gradients and built-in saliency on for the call; all restored after."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    returns_saliency = getattr(model, "return_saliency", None)
    model.requires_grad_(False)
    if returns_saliency is not None:
        model.return_saliency = True
    try:
        with evaluating(model), torch.enable_grad():
            yield
    finally:
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)
        if returns_saliency is not None:
            model.return_saliency = returns_saliency


@dataclass
class Capture:
    """What one forward pass shows of the target layer."""

    activations: torch.Tensor  # [B, K, h, w]
    gradients: torch.Tensor | None  # d(sum of target logits) / d activations, or None
    logits: torch.Tensor  # [B, num_classes]
    output: object  # the model's raw output (a zoo ModelOutput carries the built-in saliency)


class Explainer:
    """One ``explain`` call: the model, images, targets, target layer and what was captured."""

    def __init__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None,
                 layer: nn.Module | str | None, model_name: str):
        self.model = model
        self.images = images
        self.targets = targets
        self._layer_request = layer
        self._layer = None
        self._layout = None
        self.model_name = model_name
        self.network = backbone_of(model)

    @property
    def layer(self) -> nn.Module:
        """The target layer, resolved when a method first needs one."""
        if self._layer is None:
            self._layer = _resolve_layer(self.model, self._layer_request)
        return self._layer

    @property
    def layer_name(self) -> str:
        return next(name for name, module in self.model.named_modules() if module is self.layer)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits for ``x``, in float32 or finer (float64 stays float64)."""
        return _at_least_float32(logits_of(self.model(x)))

    def autocast(self, amp_dtype: torch.dtype | str | None) -> AbstractContextManager:
        """``autocast(images' device, amp_dtype)``, for the passes whose many forwards make a method's cost."""
        return autocast(self.images.device, amp_dtype)

    def score(self, logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Target logit of each row; ``rows`` maps rows to images when they are not one per image."""
        targets = self.targets if rows is None else self.targets[rows]
        return logits.gather(1, targets[:, None]).squeeze(1)

    def resolve_targets(self, logits: torch.Tensor) -> None:
        """Predicted classes when no targets were given; otherwise check them against the logits."""
        if self.targets is None:
            self.targets = logits.argmax(1)
            return
        num_classes = logits.shape[1]
        if self.targets.min() < 0 or self.targets.max() >= num_classes:
            raise ValueError(f"targets must be class indices in [0, {num_classes}) for {self.model_name}, got "
                             f"values in [{self.targets.min().item()}, {self.targets.max().item()}]")

    def check_outputs(self) -> None:
        """Refuse a model whose logits for the images are not finite, naming the images' batch positions."""
        with torch.no_grad():
            finite = self.logits(self.images).isfinite().all(1)
        if not finite.all():
            raise ValueError(f"outputs of {self.model_name} are not finite (NaN or Inf) for the images at batch "
                             f"positions {_positions(~finite)}: its saliency maps would only be zeros")

    def capture(self, gradients: bool = False) -> Capture:
        """One forward pass that records the layer's output as maps [B, K, h, w] (patch tokens put on
        their grid) and, if asked, the target logits' gradient with respect to it. The output is replaced
        by a detached leaf, so the backward pass only runs through the network above the layer
        (gradients still flow through a CA-Stream or SimPool)."""
        seen = {}

        def hook(module, inputs, output):
            self._layout = layer_layout(self.network, module, output, self.images.shape[-2:], self.model_name,
                                        self.layer_name)
            leaf = output.detach().requires_grad_(gradients)
            seen["activations"] = leaf
            return leaf

        handle = self.layer.register_forward_hook(hook)
        try:
            output = self.model(self.images)
        finally:
            handle.remove()
        if "activations" not in seen:
            raise ValueError(f"layer {type(self.layer).__name__} was not run by {self.model_name}'s forward")
        logits = logits_of(output)
        self.resolve_targets(logits)
        activations = seen["activations"]
        grads = torch.autograd.grad(self.score(logits).sum(), activations)[0] if gradients else None
        to_maps = self._layout.to_maps
        if grads is not None and grads.ndim == 3 and grads.any() and not to_maps(grads).any():
            raise ValueError(f"the target logits of {self.model_name} depend on no patch token of layer "
                             f"{type(self.layer).__name__} ({self.layer_name!r}), only on its prefix tokens (after "
                             f"the last attention only the class token reaches the head); explain a layer before "
                             f"it, e.g. the default blocks[-1].norm1")
        return Capture(to_maps(activations.detach()), None if grads is None else to_maps(grads), logits.detach(),
                       output)

    def logits_with_layer_output(self, images: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
        """Logits of ``images`` when the target layer outputs ``replacement`` (maps [B, K, h, w], put in the
        layout of the last ``capture``; prefix tokens stay the layer's own) instead of its own output."""
        layout = self._layout
        handle = self.layer.register_forward_hook(lambda module, inputs, output: layout.to_output(replacement, output))
        try:
            return self.logits(images)
        finally:
            handle.remove()



def autocast(device: torch.device, amp_dtype: torch.dtype | str | None) -> AbstractContextManager:
    """``torch.autocast`` to ``amp_dtype`` (``bfloat16`` or ``float16``, a dtype or its name) on ``device``;
    None: no autocast (the model's own dtype)."""
    if amp_dtype is None:
        return nullcontext()
    name = str(amp_dtype).removeprefix("torch.")
    if name not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be one of {', '.join(AMP_DTYPES)} or None (no autocast), got {amp_dtype!r}")
    return torch.autocast(device.type, dtype=AMP_DTYPES[name])


MEMORY_SHARE = 0.5  # of the GPU's free memory that one forward's batch may take
MAX_FORWARD_BATCH = 1024  # beyond it a GPU runs no faster per input
_PROBE = 8  # inputs in the forward that measures the memory one input takes
_BYTES_PER_INPUT: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def batch_from_memory(free_bytes: int, bytes_per_input: float, limit: int = MAX_FORWARD_BATCH) -> int:
    """The largest batch whose inputs take at most ``MEMORY_SHARE`` of ``free_bytes``, a multiple of 8 when it is
    8 or more (tensor cores work in tiles of 8), between 1 and ``limit``."""
    batch = int(MEMORY_SHARE * free_bytes // max(bytes_per_input, 1.0))
    return max(1, min(limit, batch if batch < 8 else batch // 8 * 8))


def forward_batch(model: nn.Module, example: torch.Tensor, amp_dtype: torch.dtype | str | None = None,
                  cpu: int = 8) -> int:
    """How many inputs like ``example`` [C, H, W] one no-grad forward of ``model`` (under ``amp_dtype``
    autocast) takes at a time: ``cpu`` on a CPU (where larger batches run no faster); on a GPU,
    ``batch_from_memory`` of its free memory (what PyTorch's allocator holds unused included) and of the peak
    memory per input of a probe forward of 8 inputs, measured once per model, input shape, dtype and autocast."""
    device = example.device
    if device.type != "cuda":
        return cpu
    key = (tuple(example.shape), example.dtype, str(amp_dtype))
    measured = _BYTES_PER_INPUT.setdefault(model, {})
    if key not in measured:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad(), autocast(device, amp_dtype):
            model(example.expand(_PROBE, *example.shape).contiguous())
        measured[key] = (torch.cuda.max_memory_allocated(device) - before) / _PROBE
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return batch_from_memory(free, measured[key])


def pixel_statistics(model: nn.Module, like: torch.Tensor, mean=None, std=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's input normalisation as [1, C, 1, 1] tensors like ``like`` (its data config unless given)."""
    config = resolve_data_config(model=model)
    mean = torch.as_tensor(config["mean"] if mean is None else mean, dtype=like.dtype, device=like.device)
    std = torch.as_tensor(config["std"] if std is None else std, dtype=like.dtype, device=like.device)
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def mask_images(images: torch.Tensor, masks: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalised images multiplied by masks [B, H, W] in pixel space: undo the normalisation,
    multiply, normalise again (as the thesis' evaluation and Opti-CAM do)."""
    return ((images * std + mean) * masks[:, None] - mean) / std


def weighted_map(activations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``ReLU(sum_k w_k A^k)``: the general CAM form with channel weights [B, K] (thesis eq. 1.3)."""
    return torch.einsum("bk,bkhw->bhw", weights, activations).relu()


def _at_least_float32(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.promote_types(values.dtype, torch.float32))


def _cleaned(maps: torch.Tensor) -> torch.Tensor:
    """Detached maps in float32 or finer, NaN and Inf set to 0."""
    return torch.nan_to_num(_at_least_float32(maps.detach()), nan=0.0, posinf=0.0, neginf=0.0)


def min_max(maps: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Per-image ``(A - min A) / (max A - min A + eps)`` of maps [B, H, W] (thesis eq. 1.7, 2.9). A map
    constant up to rounding (a span below 1e-5 of its largest magnitude) gives zeros; differentiable."""
    low = maps.amin((1, 2), keepdim=True)
    span = maps.amax((1, 2), keepdim=True) - low
    constant = span <= 1e-5 * maps.abs().amax((1, 2), keepdim=True)
    return torch.where(constant, 0.0, (maps - low) / (span + eps))


def normalise_per_image(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling to ``size`` then per-image min-max to [0, 1]. A constant map gives zeros,
    also when rounding in the upsampling made it differ from constant by a few ulps."""
    maps = _cleaned(maps)
    if maps.shape[-2:] != size:
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return min_max(maps)


def _positions(mask: torch.Tensor) -> str:
    return ", ".join(map(str, mask.nonzero().flatten().tolist()))


def _check_images(images: torch.Tensor, model: nn.Module, name: str) -> None:
    check_image_batch(images, getattr(model, "in_chans", 3), name)
    net = backbone_of(model)
    if has_patch_grid(net):  # a size the patch embedding refuses is named before any forward
        patch_grid(net, images.shape[-2:], name)


def check_targets(targets, batch: int, device: torch.device) -> torch.Tensor | None:
    """``targets`` as [batch] int64 class indices on ``device`` (None stays None), or a ValueError."""
    if targets is None:
        return None
    targets = torch.as_tensor(targets, device=device)
    if targets.ndim == 0:
        raise ValueError(f"targets must hold one class per image ({batch}), got a single value; "
                         "use torch.full((B,), c) to explain class c everywhere")
    if targets.ndim != 1 or len(targets) != batch or targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets must be {batch} integer class indices, one per image, got "
                         f"{targets.dtype} of shape {tuple(targets.shape)}")
    return targets.long()


def explain(model: nn.Module, images: torch.Tensor, method: str, targets=None, layer: nn.Module | str | None = None,
            **options) -> torch.Tensor:
    """Saliency maps ``[B, H, W]`` in [0, 1] of ``method`` for ``targets`` (default: predicted classes), float32
    (float64 for a float64 model).

    ``layer`` (a module or its dotted name; on a CA-Stream or SimPool model also one in its backbone) is the layer CAM
    methods explain (``default_layer``); channels-last maps and the token layers of a vision transformer or
    a Hiera's blocks are read as maps on their grid (``tokens.py``). A ``torch.compile``'d model is explained
    through the module it wraps. ``options`` go to the method (e.g. ``iterations`` for Opti-CAM), checked by
    ``check_options``. Images and the model's outputs must be finite. The model's train/eval modes and
    ``requires_grad`` flags are restored afterwards and no hook is left on it.
    """
    check_options(method, options)
    # torch.compile's wrapper (OptimizedModule) would have Dynamo trace our hooks, which swap the layer's output
    # for a detached leaf, and fail; the maps are those of the module it wraps, which is explained eagerly
    model = getattr(model, "_orig_mod", model)
    name = model_name(model)
    _check_images(images, model, name)
    targets = check_targets(targets, len(images), images.device)
    with _explaining(model), checked_inputs():  # the images are checked above, the method's forwards derive from them
        explainer = Explainer(model, images.detach(), targets, layer, name)
        raw = METHODS[method](explainer, **options)
        if not raw.isfinite().all():  # only then one more forward, to tell a broken model from a rounding issue
            explainer.check_outputs()
    return _cleaned(raw) if METHODS[method] in _FINAL else normalise_per_image(raw, images.shape[-2:])
