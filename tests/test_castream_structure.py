"""CA-Stream structure against the thesis: parameter counts (Tables 3.3-3.6) and FLOPs overhead."""

import pytest
import timm
import torch

import zoo
from zoo.evaluation import thesis_tables
from zoo.models.cost import gflops, parameter_count

THESIS_MODELS = sorted(thesis_tables.TABLE_3_3)


def meta_model(name, **kwargs):
    """Build on the meta device: shapes and counts without allocating weights."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def millions(n):
    return n / 1e6


def test_registered_with_timm():
    for name in ("resnet18_castream", "resnet50_castream", "convnext_small_castream", "convnext_base_castream"):
        assert name in timm.list_models("*castream")
        assert f"{name}.in1k" in zoo.list_models(pretrained=True)
    assert set(zoo.list_models("*_castream")) == set(timm.list_models("*_castream"))
    families = set(timm.list_models("*_castream")) | set(timm.list_models("*_simpool"))
    assert set(zoo.list_models()) == families | {"resnet18_cifar", "mobilenetv2_cifar"}


@pytest.mark.parametrize("name", THESIS_MODELS)
def test_parameter_counts_match_table_3_3(name):
    figures = thesis_tables.TABLE_3_3[name]
    model = meta_model(name)
    # the thesis prints two decimals of millions, rounded or truncated: agree to its last digit
    assert abs(millions(parameter_count(model)) - figures["params_m"]) < 0.01
    assert abs(millions(parameter_count(model.backbone)) - figures["gap_params_m"]) < 0.01
    assert abs(millions(parameter_count(model.stream)) - figures["stream_params_m"]) < 0.01
    assert parameter_count(model) == parameter_count(model.backbone) + parameter_count(model.stream)


def test_stream_parameters_follow_the_closed_form():
    # the query q_0, then a linear layer with bias per stage (thesis eq. 3.3, 3.7): d_0 + sum_l (d_l d_{l+1} + d_{l+1}),
    # with d_{L+1} = d_L
    widths = [64, 256, 512, 1024, 2048]
    out = widths[1:] + widths[-1:]
    expected = widths[0] + sum(d * e + e for d, e in zip(widths, out, strict=True))
    assert parameter_count(meta_model("resnet50_castream").stream) == expected == 6_969_152


@pytest.mark.parametrize("start", sorted(thesis_tables.TABLE_3_5_STREAM_PARAMS_M))
def test_resnet50_placement_matches_table_3_5(start):
    stream = meta_model("resnet50_castream", stream_start=start).stream
    assert len(stream.blocks) == 5 - start
    assert abs(millions(parameter_count(stream)) - thesis_tables.TABLE_3_5_STREAM_PARAMS_M[start]) < 0.01


def test_resnet50_proj_ca_matches_table_3_4():
    stream = meta_model("resnet50_castream", kv_proj=True).stream
    assert abs(millions(parameter_count(stream)) - thesis_tables.TABLE_3_4_STREAM_PARAMS_M["proj_ca"]) < 0.01


def test_resnet50_class_specific_matches_table_3_6():
    model = meta_model("resnet50_castream", class_specific=True)
    assert model.stream.query.shape == (1000, 64)
    assert abs(millions(parameter_count(model)) - thesis_tables.TABLE_3_6_PARAMS_M["class_specific"]) < 0.01


@pytest.mark.parametrize("name", THESIS_MODELS)
def test_flops_overhead_matches_table_3_3(name):
    # Counting conventions differ (our absolute GFLOPs are ~1% below the thesis'), the stream's
    # overhead does not: both figures have three decimals, so their difference is known to +-0.001.
    figures = thesis_tables.TABLE_3_3[name]
    model = meta_model(name)
    overhead = gflops(model) - gflops(model.backbone)
    assert abs(overhead - (figures["gflops"] - figures["gap_gflops"])) <= 0.001 + 1e-6


def test_unknown_model_name_is_named():
    with pytest.raises(RuntimeError, match="resnet51_castream"):
        timm.create_model("resnet51_castream")


def test_unsupported_backbone_is_named():
    with pytest.raises(ValueError, match="ResNet, ConvNeXt, RegNet backbone; 'vit_tiny_patch16_224' is a Vision"):
        zoo.CAStream(backbone="vit_tiny_patch16_224")


def test_bad_stream_options_are_named():
    with pytest.raises(ValueError, match="stream_start must be a stage index in 0..4"):
        meta_model("resnet50_castream", stream_start=5)
    with pytest.raises(ValueError, match="global_pool='' cannot be set"):
        meta_model("resnet18_castream", global_pool="")
