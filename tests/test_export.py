"""Every zoo family through ``torch.export``, ONNX (run by onnxruntime) and ``torch.compile``: the logits and the
saliency of eager mode at batch sizes other than the one exported with. ``test_castream_compile.py`` covers
CA-Stream's compiled training, inductor and benchmark; here compilation is checked for the other families."""

import onnxruntime as ort
import pytest
import timm
import torch

import zoo
from zoo.export import exported_program, to_onnx

SIZE = 32
CASES = {  # one per family, the smallest backbones, and the option that changes the graph
    "castream": ("resnet18_castream", {}),
    "castream_class_specific": ("resnet18_castream", {"class_specific": True}),  # data-dependent query choice
    "castream_convnext": ("convnext_tiny_castream", {"backbone": "convnext_atto"}),
    "simpool": ("resnet18_simpool", {}),
    "resnet_cifar": ("resnet18_cifar", {"widths": (8, 16, 32, 64)}),
    "mobilenet_cifar": ("mobilenetv2_cifar", {}),
}


def build(case, **kwargs):
    torch.manual_seed(0)  # fixed weights and images
    name, options = CASES[case]
    return timm.create_model(name, num_classes=10, **options, **kwargs).eval()


def batch(size):
    return torch.randn(size, 3, SIZE, SIZE)


def assert_close(got, expected):
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_torch_export_and_onnx_give_eager_outputs_at_any_batch_size(case, tmp_path):
    model = build(case)
    program = exported_program(model, (3, SIZE, SIZE))  # traced at batch 2
    session = ort.InferenceSession(to_onnx(model, tmp_path / "model.onnx", (3, SIZE, SIZE)))
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits", "saliency"]
    for size in (1, 3):
        x = batch(size)
        with torch.no_grad():
            expected = model(x)
            got = program.module()(x)
        assert isinstance(got, zoo.ModelOutput)
        assert_close(got.logits, expected.logits)
        assert_close(got.saliency, expected.saliency)
        if case == "castream_class_specific" and size == 3:
            # the images pick different queries, so a graph that fixed the query at tracing would fail
            assert model._query_classes(list(model._stage_features(x))[-1], None).unique().numel() > 1
        logits, saliency = session.run(None, {"images": x.numpy()})
        assert_close(torch.from_numpy(logits), expected.logits)
        assert_close(torch.from_numpy(saliency), expected.saliency)


def test_onnx_of_plain_logits_has_one_output(tmp_path):
    model = build("simpool", return_saliency=False)
    session = ort.InferenceSession(to_onnx(model, tmp_path / "model.onnx", (3, SIZE, SIZE)))
    assert [o.name for o in session.get_outputs()] == ["logits"]
    x = batch(3)
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(logits), model(x))


@pytest.mark.parametrize("case", ["castream_class_specific", "simpool", "resnet_cifar", "mobilenet_cifar"])
def test_compiles_as_one_graph_to_eager_outputs(case):
    torch._dynamo.reset()
    model = build(case)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        for size in (2, 3):  # the second size recompiles with a symbolic batch dimension
            x = batch(size)
            got, expected = compiled(x), model(x)
            assert isinstance(got, zoo.ModelOutput)
            assert_close(got.logits, expected.logits)
            assert_close(got.saliency, expected.saliency)
    torch._dynamo.reset()
