"""Model-parameter randomisation sanity checks: MPRT and IMPRT (Adebayo et al., NeurIPS 2018, "Sanity Checks for
Saliency Maps", §3.1) and eMPRT (Hedström et al. 2023, "Sanity Checks Revisited: An Exploration to Repair the Model
Parameter Randomisation Test").

**Randomisation.** A copy of the model (``copy.deepcopy``; the caller's model, its modes, flags and torch's random
state are left as they were) has its layers re-initialised step by step from the top: *cascading*, each step adds
one more randomised step's modules to those before; *independent*, one step at a time, everything else trained. The
randomised modules are those Quantus' ``get_random_layer_generator`` randomises, the modules with a
``reset_parameters`` (convolutions, linear layers, norms: a BatchNorm's reset is deterministic, weight 1, bias 0,
running mean 0 and variance 1), each by its own ``reset_parameters`` right after torch's generators are seeded with
``seed + 1``, as Quantus does: seed s here gives Quantus' models for its seed s (each module drawn from the same
seed, so layers of one shape get the same weights, there as here). Parameters held by a module without
``reset_parameters`` (CA-Stream's query, a ViT's class token and position embedding, ConvNeXt's layer scale) keep
their trained values, as in Quantus.

**Order.** Top-down is the reverse of the order in which one forward pass (of the first image) last runs the
modules; a module the forward never runs cannot change a map and is left out. For timm's CNNs and ViTs that is the
modules' registration order, so the ``layers`` preset is exactly Quantus' ``top_down`` order (``named_modules``
reversed) there. A CA-Stream's stream runs beside its backbone: the order goes from the classifier
(``backbone.fc``) to the last stream block, then the last stage's blocks, then stream block L - 1, the stage before,
..., stream block 0, and the stem last (Quantus' registration order would put the whole stream before the
classifier); a SimPool's pooling comes right after the classifier. A frozen backbone is randomised as any other
part: the model is everything its forward uses.

**Presets** (``PRESETS``): ``layers``, one step per randomised module (Quantus' granularity: 41 steps on a ResNet-18,
107 on a ResNet-50); ``blocks`` (the harness'), one step per block of the module tree: the model's children, where
a sequence of blocks (an ``nn.Sequential`` or ``nn.ModuleList`` whose children with parameters are all of one class:
a ResNet's ``layer1``, a ConvNeXt's or ViT's ``blocks``, VGG's ``features``, CA-Stream's ``stream.blocks``) or a
module holding one (a ConvNeXt stage) is replaced by its children, recursively; every other module is one block.
On a ResNet: the classifier, each residual block, ``bn1``, ``conv1`` (11 steps on a ResNet-18, 19 on a ResNet-50);
on a ConvNeXt: the head, each block and each downsampling layer, the stem. Adebayo et al. randomise Inception v3
block by block too (logits, Mixed_7c, ..., Conv2d_1a_3x3).

**Similarity** of each map with the original one, per image: ``spearman``, the rank correlation (ties get their
average rank, as ``scipy.stats.spearmanr``), and ``ssim``, scikit-image's ``structural_similarity`` with the
settings Quantus' ``ssim`` calls it with: a 7 x 7 uniform window (no Gaussian weights), K1 = 0.01, K2 = 0.03,
sample covariance, ``data_range`` the pair's joint span (max - min over both maps), the mean over the windows that
lie inside the map. Constant maps, as ADCC's coherency (``adcc.coherency``): a map is constant when its span is at
most 1e-5 of its largest magnitude (``explain`` turns such a map into zeros); two constant maps are alike
(Spearman 1, SSIM 1: scipy gives NaN, scikit-image NaN for two equal constants and the luminance term alone for
two different ones), a constant map beside a varying one has no rank correlation (Spearman 0: scipy gives NaN; its
SSIM is scikit-image's, defined there).

**Metrics** (per image, lower is better for the four similarities: a method that passes changes its maps): MPRT and
MPRT-SSIM, the mean over the cascading steps of the Spearman correlation and of the SSIM; IMPRT and IMPRT-SSIM, the
same over the independent steps (Quantus' ``return_average_correlation``, without the ``"original"`` entry that
Quantus 0.6 averages in, its maps compared with themselves).

**eMPRT** (higher is better): the ratio of the complexity of the map on the fully randomised model (the last
cascading step) to that of the original map, the complexity being the discrete entropy of the map's histogram
(``discrete_entropy``: 100 equal bins between its minimum and maximum, Shannon entropy in nats, Quantus'
``discrete_entropy`` with its default ``n_bins``); a random model's maps should be noisier. Quantus 0.6 reports the
relative change, this ratio minus 1. NaN (left out) where the original map is constant (entropy 0). We implement
eMPRT rather than sMPRT: eMPRT is fully determined by the paper (one randomised model, one entropy, no similarity
function and no layer order to choose, the top-down order's bias that the paper criticises gone), where sMPRT keeps
MPRT's similarity function and order and adds a noise level and a sample count to choose, at that many times
MPRT's cost.

**Cost** per image in the harness (``blocks``): one explanation per cascading step and one per independent step but
the first (randomising the top step alone is the first cascading step): 21 on a ResNet-18, 37 on a ResNet-50 (with
``layers``: 81 and 213). The harness keeps the similarities [N, S, 2] and the last step's maps, not every step's.
"""

import copy
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from zoo.evaluation.saliency import explain
from zoo.evaluation.saliency.core import evaluating
from zoo.metrics import Metric, register_metric

from ._checks import check_finite, check_maps
from .adcc import _is_constant
from .inputs import Explanations, computed_input

__all__ = ["ENTROPY_BINS", "HARNESS_PRESET", "MEASURES", "ORDERS", "PRESETS", "SANITY_SEED", "Randomisation",
           "RandomisationStep", "average_similarity", "discrete_entropy", "efficient_mprt", "model_randomisation",
           "randomisation_steps", "randomised_models", "spearman", "ssim"]

PRESETS = {
    "layers": "one step per module with reset_parameters (Quantus' MPRT)",
    "blocks": "one step per block of the module tree (the classifier, each residual or transformer block, ...)",
}
HARNESS_PRESET = "blocks"
ORDERS = ("cascading", "independent")
MEASURES = ("spearman", "ssim")  # the last axis of Randomisation's similarities
SANITY_SEED = 42  # Quantus' default seed (torch's generators are seeded with seed + 1 before each reset, as there)
ENTROPY_BINS = 100  # Quantus' discrete_entropy default, the paper's n
SSIM_WINDOW = 7  # scikit-image's default uniform window
SSIM_K1, SSIM_K2 = 0.01, 0.03


class RandomisationStep(NamedTuple):
    """One step of the randomisation: its name (the block's or the module's) and the modules it re-initialises."""

    name: str
    modules: tuple[str, ...]


class Randomisation(NamedTuple):
    """The harness' input ``sanity`` (``model_randomisation``): ``steps``, the steps' names, top-down;
    ``cascading`` and ``independent`` [N, S, 2], the similarity (``MEASURES``: Spearman, SSIM) of each row's map on
    the model randomised up to step s (cascading) or at step s alone (independent) with its original map;
    ``randomised_maps`` [N, H, W], the maps on the fully randomised model (the last cascading step)."""

    steps: tuple[str, ...]
    cascading: torch.Tensor
    independent: torch.Tensor
    randomised_maps: torch.Tensor


# --- the similarities and the complexity ------------------------------------------------------------------------

def _average_ranks(flat: torch.Tensor) -> torch.Tensor:
    """Ranks [N, P] (float64, from 1) of each row's values, tied values sharing their average rank."""
    values, order = flat.sort(dim=1, stable=True)
    count = flat.shape[1]
    position = torch.arange(count, device=flat.device).expand_as(values)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, position, 0).cummax(1).values
    last = torch.where(ends, position, count).flip(1).cummin(1).values.flip(1)
    average = (first + last).double() / 2 + 1
    return torch.empty_like(average).scatter_(1, order, average)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation [N] of maps ``a`` and ``b`` [N, H, W], image by image: Pearson's correlation of
    their ranks, tied values sharing their average rank (``scipy.stats.spearmanr``). Two constant maps give 1, a
    constant one beside a varying one 0 (module docstring)."""
    check_maps(a=a, b=b)
    flat_a, flat_b = a.detach().flatten(1), b.detach().flatten(1)
    constant_a, constant_b = _is_constant(flat_a), _is_constant(flat_b)
    ranks_a, ranks_b = _average_ranks(flat_a), _average_ranks(flat_b)
    ranks_a = ranks_a - ranks_a.mean(1, keepdim=True)
    ranks_b = ranks_b - ranks_b.mean(1, keepdim=True)
    norms = (ranks_a.square().sum(1) * ranks_b.square().sum(1)).sqrt()
    r = ((ranks_a * ranks_b).sum(1) / norms.clamp(min=torch.finfo(norms.dtype).tiny)).clamp(-1, 1)
    r = torch.where(constant_a | constant_b, (constant_a & constant_b).double(), r)
    return r.to(torch.promote_types(a.dtype, torch.float32))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The structural similarity [N] of maps ``a`` and ``b`` [N, H, W] (H, W >= 7), image by image, as Quantus'
    ``ssim`` has ``skimage.metrics.structural_similarity`` compute it (module docstring: 7 x 7 uniform window,
    K1 0.01, K2 0.03, sample covariance, data range the pair's joint span), in float64. Two constant maps give 1."""
    _, height, width = check_maps(a=a, b=b)
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"maps must be at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels (SSIM's window), got "
                         f"{height} x {width}")
    x, y = a.detach().double()[:, None], b.detach().double()[:, None]
    both = torch.cat([x, y], 1).flatten(1)
    span = (both.amax(1) - both.amin(1))[:, None, None, None]
    c1, c2 = (SSIM_K1 * span) ** 2, (SSIM_K2 * span) ** 2

    def window_mean(t: torch.Tensor) -> torch.Tensor:  # only windows inside the map: scikit-image's crop
        return nn.functional.avg_pool2d(t, SSIM_WINDOW, stride=1)

    mean_x, mean_y = window_mean(x), window_mean(y)
    cov_norm = SSIM_WINDOW**2 / (SSIM_WINDOW**2 - 1)
    var_x = cov_norm * (window_mean(x * x) - mean_x * mean_x)
    var_y = cov_norm * (window_mean(y * y) - mean_y * mean_y)
    cov = cov_norm * (window_mean(x * y) - mean_x * mean_y)
    s = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
    constant = _is_constant(x.flatten(1)) & _is_constant(y.flatten(1))
    value = torch.where(constant, 1.0, s.flatten(1).mean(1))
    return value.to(torch.promote_types(a.dtype, torch.float32))


def discrete_entropy(maps: torch.Tensor, bins: int = ENTROPY_BINS) -> torch.Tensor:
    """The discrete entropy [N] (nats) of each map's histogram of ``bins`` equal bins between its minimum and maximum
    (a constant map: one bin, entropy 0), as Quantus' ``discrete_entropy`` (``numpy.histogram``, computed in the
    maps' dtype as numpy does, the last bin closed; ``scipy.stats.entropy`` of the counts)."""
    count, _, _ = check_maps(maps=maps)
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    flat = maps.detach().flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    constant = low == high
    low, high = torch.where(constant, low - 0.5, low), torch.where(constant, high + 0.5, high)
    index = ((flat - low) / (high - low) * bins).long().clamp(max=bins - 1)
    # numpy corrects the index against its bin edges (``linspace``), which may differ from it by an ulp
    edges = torch.arange(bins + 1, dtype=flat.dtype, device=flat.device) * ((high - low) / bins) + low
    edges[:, -1] = high[:, 0]
    index -= (flat < edges.gather(1, index)).long()
    index += ((flat >= edges.gather(1, index + 1)) & (index != bins - 1)).long()
    counts = torch.zeros(count, bins, dtype=torch.float64, device=flat.device)
    counts.scatter_add_(1, index, torch.ones_like(counts[:, :1]).expand_as(flat))
    p = counts / flat.shape[1]
    return -torch.xlogy(p, p).sum(1).to(torch.promote_types(maps.dtype, torch.float32))


def efficient_mprt(maps: torch.Tensor, randomised_maps: torch.Tensor, bins: int = ENTROPY_BINS) -> torch.Tensor:
    """eMPRT [N] (Hedström et al. 2023): ``discrete_entropy`` of each map on the fully randomised model over that of
    the original map, both [N, H, W]; higher is better (the randomised model's maps are more complex). NaN where the
    original map is constant (entropy 0: no ratio)."""
    check_maps(maps=maps, randomised_maps=randomised_maps)
    before, after = discrete_entropy(maps, bins), discrete_entropy(randomised_maps, bins)
    return torch.where(before > 0, after / before.clamp(min=torch.finfo(before.dtype).tiny), torch.nan)


def average_similarity(similarities: torch.Tensor) -> torch.Tensor:
    """The MPRT value [N] of per-step similarities [N, S] (each in [-1, 1]): their mean over the steps."""
    check_finite("[N, S] of similarities in [-1, 1]", 2, similarities=similarities)
    if similarities.min() < -1 or similarities.max() > 1:
        raise ValueError(f"similarities must lie in [-1, 1], got values in [{similarities.min().item():.4g}, "
                         f"{similarities.max().item():.4g}]")
    return similarities.mean(1)


# --- the randomised models --------------------------------------------------------------------------------------

def _is_sequence_of_blocks(module: nn.Module) -> bool:
    """A Sequential or ModuleList whose children with parameters are all of one class."""
    if not isinstance(module, nn.Sequential | nn.ModuleList):
        return False
    kinds = {type(child) for child in module.children() if next(child.parameters(), None) is not None}
    return len(kinds) == 1


def _blocks(module: nn.Module, prefix: str = "") -> list[str]:
    """The names of ``module``'s blocks (module docstring, ``blocks``), in registration order."""
    names = []
    for name, child in module.named_children():
        if _is_sequence_of_blocks(child) or any(_is_sequence_of_blocks(grandchild) for grandchild in child.children()):
            names += _blocks(child, f"{prefix}{name}.")
        else:
            names.append(f"{prefix}{name}")
    return names


def _block_of(name: str, blocks: list[str]) -> str:
    """The block that holds module ``name`` (the module itself where it holds blocks)."""
    return next((block for block in blocks if name == block or name.startswith(f"{block}.")), name)


def randomisation_steps(model: nn.Module, images: torch.Tensor, preset: str = HARNESS_PRESET) -> list[
        RandomisationStep]:
    """The steps of ``preset`` (``PRESETS``) for ``model``, top-down: the modules with ``reset_parameters`` that a
    forward pass of ``images[:1]`` runs (in eval mode, without gradients), in the reverse of the order it last runs
    them, one per step (``layers``) or grouped by block (``blocks``), a block placed by its last module run."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    model = getattr(model, "_orig_mod", model)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not len(images):
        raise ValueError("images must be a non-empty batch [N, C, H, W]")
    names = {module: name for name, module in model.named_modules() if hasattr(module, "reset_parameters")}
    calls = []
    handles = [module.register_forward_pre_hook(lambda module, args: calls.append(module)) for module in names]
    try:
        with evaluating(model), torch.no_grad():
            model(images[:1])
    finally:
        for handle in handles:
            handle.remove()
    last_run = {module: i for i, module in enumerate(calls)}
    ran = [names[module] for module in sorted(last_run, key=last_run.get, reverse=True)]
    if not ran:
        raise ValueError(f"{type(model).__name__}'s forward runs no module with reset_parameters: nothing to randomise")
    if preset == "layers":
        return [RandomisationStep(name, (name,)) for name in ran]
    blocks, grouped = _blocks(model), {}
    for name in ran:
        grouped.setdefault(_block_of(name, blocks), []).append(name)
    return [RandomisationStep(block, tuple(members)) for block, members in grouped.items()]


def _reset(module: nn.Module, seed: int) -> None:
    """``module.reset_parameters()`` right after torch's generators are seeded with ``seed + 1`` (Quantus), torch's
    random state restored after."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed + 1)
        if cuda:
            torch.cuda.manual_seed_all(seed + 1)
        module.reset_parameters()


def randomised_models(model: nn.Module, steps: list[RandomisationStep], seed: int = SANITY_SEED,
                      order: str = "cascading") -> Iterator[tuple[str, nn.Module]]:
    """Yield each step's name and a copy of ``model`` randomised (module docstring) by the steps up to it
    (``cascading``) or by it alone (``independent``). One copy is made and changed in place from step to step: use
    it before taking the next. ``model`` is not changed."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    randomised = copy.deepcopy(getattr(model, "_orig_mod", model))
    modules = dict(randomised.named_modules())
    unknown = [name for step in steps for name in step.modules if not hasattr(modules.get(name), "reset_parameters")]
    if unknown:
        raise ValueError(f"steps name modules without reset_parameters in {type(model).__name__}: "
                         f"{', '.join(unknown)}")
    for step in steps:
        saved = {name: {key: value.clone() for key, value in modules[name].state_dict().items()}
                 for name in step.modules} if order == "independent" else {}
        for name in step.modules:
            _reset(modules[name], seed)
        yield step.name, randomised
        for name, state in saved.items():
            modules[name].load_state_dict(state)


def _portable(model: nn.Module, options: dict) -> dict:
    """Method options with a module (``layer``) named instead, so that they find it in the model's copy."""
    names = {module: name for name, module in getattr(model, "_orig_mod", model).named_modules()}
    portable = {}
    for key, value in options.items():
        if isinstance(value, nn.Module):
            if value not in names:
                raise ValueError(f"option {key}: {type(value).__name__} is not a module of this "
                                 f"{type(model).__name__}")
            value = names[value]
        portable[key] = value
    return portable


def _similarities(maps: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    return torch.stack([spearman(maps, other), ssim(maps, other)], -1)


def model_randomisation(model: nn.Module, images: torch.Tensor, method: str, targets: torch.Tensor,
                        maps: torch.Tensor | None = None, options: dict | None = None, preset: str = HARNESS_PRESET,
                        seed: int = SANITY_SEED, progress: bool = False) -> Randomisation:
    """The randomisation test of ``method`` (with ``options``) on ``images`` [N, C, H, W] for the classes ``targets``
    [N], explained with the same classes on every randomised model: ``maps`` [N, H, W] (default: explained on
    ``model``) compared with the maps on each step's cascading and independent randomisation of ``preset``
    (``randomisation_steps``, ``randomised_models`` with ``seed``). ``progress``: a progress bar over the steps."""
    if targets is None:
        raise ValueError("targets must be given: the same classes are explained on every randomised model")
    options = _portable(model, options or {})
    if maps is None:
        maps = explain(model, images, method, targets, **options)
    check_maps(maps=maps)
    if maps.shape != (len(images), *images.shape[-2:]):
        raise ValueError(f"maps must be [N, H, W] like the images {list(images.shape)}, got {list(maps.shape)}")
    steps = randomisation_steps(model, images, preset)
    similarities = {order: [] for order in ORDERS}
    with tqdm(total=2 * len(steps) - 1, desc=f"randomising for {method}", disable=not progress, leave=False) as bar:
        for order in ORDERS:
            for index, (name, randomised) in enumerate(randomised_models(model, steps, seed, order)):
                if order == "independent" and index == 0:  # the top step alone: the first cascading step
                    similarities[order].append(similarities["cascading"][0])
                    continue
                bar.set_postfix_str(f"{order} {name}")
                randomised_maps = explain(randomised, images, method, targets, **options)
                similarities[order].append(_similarities(maps, randomised_maps.to(maps.device)))
                bar.update()
                if order == "cascading":
                    last = randomised_maps
    return Randomisation(tuple(step.name for step in steps), torch.stack(similarities["cascading"], 1),
                         torch.stack(similarities["independent"], 1), last)


# --- the harness' input and the metrics ------------------------------------------------------------------------

@computed_input("sanity", "the model-parameter randomisation test: each row's map on the model randomised block by "
                          "block from the top, cascading and independent, compared with its map (Randomisation)",
                explains=True)
def explained_randomisation(explained: Explanations) -> Randomisation:
    """``model_randomisation`` of the harness' explanations, with the ``HARNESS_PRESET`` and ``SANITY_SEED``."""
    if explained.method is None:
        raise ValueError("the randomisation test explains the randomised models: it needs a saliency method, not a "
                         "ground truth")
    return model_randomisation(explained.model, explained.images, explained.method, explained.classes,
                               explained.maps, explained.options)


def _per_step(sanity: Randomisation, order: str, measure: str) -> torch.Tensor:
    """The similarities [N, S] of ``order`` and ``measure`` from the input ``sanity``."""
    if not isinstance(sanity, Randomisation):
        raise ValueError(f"sanity must be a Randomisation (model_randomisation), got {type(sanity).__name__}")
    return getattr(sanity, order)[..., MEASURES.index(measure)]


def _declare(key: str, name: str, order: str, measure: str) -> None:
    register_metric(Metric(key=key, name=name, index_type=key.lower().replace("-", "_"), higher_is_better=False,
                           per_image=lambda sanity: average_similarity(_per_step(sanity, order, measure)),
                           needs=("sanity",), table="sanity", group="sanity", percent=False, by_default=False))


_declare("MPRT", "model parameter randomisation, cascading (Spearman)", "cascading", "spearman")
_declare("MPRT-SSIM", "model parameter randomisation, cascading (SSIM)", "cascading", "ssim")
_declare("IMPRT", "model parameter randomisation, independent (Spearman)", "independent", "spearman")
_declare("IMPRT-SSIM", "model parameter randomisation, independent (SSIM)", "independent", "ssim")


def _emprt(maps: torch.Tensor, sanity: Randomisation) -> torch.Tensor:
    if not isinstance(sanity, Randomisation):
        raise ValueError(f"sanity must be a Randomisation (model_randomisation), got {type(sanity).__name__}")
    return efficient_mprt(maps, sanity.randomised_maps.to(maps.device))


register_metric(Metric(key="eMPRT", name="efficient model parameter randomisation (entropy ratio)", index_type="emprt",
                       higher_is_better=True, per_image=_emprt, needs=("maps", "sanity"), table="sanity",
                       group="sanity", percent=False, by_default=False))
