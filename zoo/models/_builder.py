"""What every zoo family's ``_create_…`` helper shares: timm's builder, and a clear error for missing weights."""

from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from torch import nn

from ..hub import verify_source

__all__ = ["build_zoo_model"]


def build_zoo_model(model_cls: type[nn.Module], variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.models.build_model_with_cfg`` for a zoo variant; weights that cannot be found raise a RuntimeError
    that says where they were looked for and how to load others (``kwargs`` go to the builder). A checkpoint folder
    timm loads through ``local-dir:`` or ``hf-hub:`` is checked first (``zoo.hub.verify_checkpoint``)."""
    if pretrained:  # timm's local-dir: and hf-hub: read the folder as it is: checked first, as load_model does
        verify_source(kwargs.get("pretrained_cfg"))
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except (EntryNotFoundError, RepositoryNotFoundError) as error:
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        raise RuntimeError(
            f"no weights found for {variant} at hf-hub:{cfg.hf_hub_id} (not in the local cache, not downloadable: "
            f"{error})\nThe README's 'Weights' section lists the zoo checkpoints that exist; "
            "pretrained_cfg_overlay=dict(file=...) or dict(hf_hub_id=...) loads others."
        ) from error
