"""CA-Stream under torch.compile: whole graphs (``fullgraph=True`` makes a graph break an error) in both output modes,
outputs and stream gradients as in eager mode, and the throughput benchmark's compiled modes end to end."""

import json
import shutil

import pytest
import timm
import torch
from scripts import run_script

import zoo

SIZE = 64
CXX = shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # every test compiles its own graphs, whatever the earlier tests left
    yield
    torch._dynamo.reset()


def build(name="resnet18_castream", **kwargs):
    if name == "convnext_tiny_castream":
        kwargs["backbone"] = "convnext_atto"  # the smallest ConvNeXt: the same code path, quicker to trace
    return timm.create_model(name, num_classes=10, **kwargs)


def assert_same_output(got, expected, return_saliency):
    if return_saliency:
        assert isinstance(got, zoo.ModelOutput)
        torch.testing.assert_close(got.saliency, expected.saliency, rtol=0, atol=1e-5)
        got, expected = got.logits, expected.logits
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18_castream", "convnext_tiny_castream"])
@pytest.mark.parametrize("return_saliency", [True, False])
def test_inference_compiles_as_one_graph_at_any_batch_size(name, return_saliency):
    model = build(name, return_saliency=return_saliency).eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        for batch in (2, 3):  # the second size recompiles with a symbolic batch dimension
            x = torch.randn(batch, 3, SIZE, SIZE)
            assert_same_output(compiled(x), model(x), return_saliency)


@pytest.mark.parametrize("return_saliency", [True, False])
def test_stream_training_compiles_with_the_gradients_of_eager_mode(return_saliency):
    model = build(return_saliency=return_saliency).freeze_backbone().train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # traces the backward as well
    x = torch.randn(2, 3, SIZE, SIZE)
    running_mean = model.backbone.bn1.running_mean.clone()

    def stream_gradients(forward):
        model.zero_grad()
        out = forward(x)
        loss = out.logits.square().sum() + out.saliency.sum(0).square().sum() if return_saliency else out.sum()
        loss.backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        return out, [p.grad for p in model.stream.parameters()]

    out, gradients = stream_gradients(compiled)
    expected_out, expected_gradients = stream_gradients(model)
    assert_same_output(out, expected_out, return_saliency)
    assert len(gradients) == len(expected_gradients) == 11  # q_0 and the five projections' weights and biases
    for got, expected in zip(gradients, expected_gradients, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.backbone.bn1.running_mean, running_mean, rtol=0, atol=0)  # frozen: eval BN


@pytest.mark.skipif(CXX is None, reason="inductor compiles C++ kernels on a CPU and finds no C++ compiler here")
def test_inductor_compiles_the_model_to_eager_outputs():
    model = build().eval()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert_same_output(compiled(x), model(x), return_saliency=True)


def test_throughput_benchmark_runs_eager_and_compiled(tmp_path, capsys):
    run_script("benchmarks/castream_throughput.py",
               ["--quick", "--device", "cpu", "--backend", "aot_eager", "--out", str(tmp_path)])
    (json_file,) = tmp_path.glob("castream_throughput-*.json")
    result = json.loads(json_file.read_text())
    assert result["backend"] == "aot_eager" and result["torch"] == torch.__version__
    rows = result["rows"]
    assert [(row["model"], row["batch"], row["mode"]) for row in rows] == [
        ("resnet18_castream", 2, "eager"), ("resnet18_castream", 2, "compile")]
    for row in rows:
        assert row["ratio_q1"] <= row["ratio"] <= row["ratio_q3"] and 0 < row["stream_share"] < 1
        assert row["gap_img_per_s"] > 0 and row["castream_img_per_s"] > 0
    assert json_file.with_suffix(".png").stat().st_size > 0
    assert "resnet18_castream                  compile     2" in capsys.readouterr().out
