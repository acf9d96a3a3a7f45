"""The protocol throughput benchmark: its peak lookup and projection by hand, a quick run end to end, and its
side-by-side measurement against a git revision."""

import json
from pathlib import Path

import pytest
from scripts import load_script, run_script

import zoo

benchmark = load_script("benchmarks/protocol_throughput.py")
QUICK = ["--quick", "--device", "cpu", "--models", "vit_tiny_patch16_224"]


def test_peaks_come_from_the_datasheets_and_unknown_devices_have_none():
    peak = benchmark["peak_flops"]
    assert peak("NVIDIA H200", "bfloat16") == 989.4e12
    assert peak("NVIDIA H100 80GB HBM3", "float32") == 66.9e12
    assert peak("NVIDIA H100 80GB HBM3", "float32", tf32=True) == 494.7e12
    assert peak("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12 and peak("NVIDIA A100-PCIE-40GB", "float32") == 19.5e12
    for other in ("NVIDIA GeForce RTX 4090", "NVIDIA H100 PCIe", "NVIDIA GH200 480GB", "NVIDIA RTX A1000",
                  "CPU, 2 threads"):
        assert peak(other, "bfloat16") is None, other


def test_projection_and_share_of_peak_by_hand():
    assert benchmark["projected_seconds"](10.0) == 5000.0
    assert benchmark["share_of_peak"](494.7e12, 989.4e12) == 0.5 and benchmark["share_of_peak"](1e12, None) is None
    row = dict(model="resnet50", method="scorecam", flops_per_image=2e12, images_per_s=10.0)
    reported = benchmark["reported"](row, 100e12)
    assert reported["projected_h"] == 5000.0 / 3600 and reported["tflops_per_s"] == 20.0
    assert reported["share_of_peak"] == 0.2 and reported["thesis_seconds_per_image"] == 15.22 / 8
    other = benchmark["reported"](dict(row, method="gradcam", flops_per_image=1e12, images_per_s=40.0), 100e12)
    (total,) = benchmark["whole_protocol"]([reported, other], 100e12)
    assert total["projected_s"] == 5000.0 + 1250.0 and total["images_per_s"] == 50_000 / 6250.0
    assert total["share_of_peak"] == pytest.approx((2e12 + 1e12) * 50_000 / 6250.0 / 100e12)
    assert total["fastest_method"] == "gradcam"


def test_quick_run_writes_rows_totals_and_the_loader(tmp_path, capsys):
    data = tmp_path / "photos"
    run_script("benchmarks/protocol_throughput.py",
               [*QUICK, "--methods", "gradcam", "scorecam", "--data", str(data), "--out", str(tmp_path)])
    (json_file,) = tmp_path.glob("protocol_throughput-*.json")
    result = json.loads(json_file.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert [(row["model"], row["method"]) for row in result["rows"]] == [("vit_tiny_patch16_224", "gradcam"),
                                                                         ("vit_tiny_patch16_224", "scorecam")]
    assert all(row["images"] == 2 and row["images_per_s"] > 0 and row["flops_per_image"] > 0 for row in rows.values())
    assert rows["scorecam"]["flops_per_image"] > 2 * rows["gradcam"]["flops_per_image"]  # a forward per channel
    assert all(row["share_of_peak"] is None for row in [*result["rows"], *result["totals"]])
    assert result["setting"]["precision"] == "float32" and result["setting"]["peak_flops"] is None
    (loader,) = result["loader"]
    assert loader["images"] == 1000 and loader["images_per_s"] > 0
    assert len(list((data / "val").iterdir())) == 1000
    assert json_file.with_suffix(".md").exists() and json_file.with_suffix(".png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| vit_tiny_patch16_224 | scorecam | 2 | 32 |" in printed and "peak used: unknown" in printed


def test_against_a_revision_measures_both_sides_from_their_own_trees(tmp_path):
    run_script("benchmarks/protocol_throughput.py",
               [*QUICK, "--methods", "gradcam", "--against", "HEAD", "--rounds", "1", "--out", str(tmp_path)])
    (json_file,) = tmp_path.glob("protocol_throughput-*.json")
    result = json.loads(json_file.read_text())
    against = result["against"]
    assert against["zoo_folders"]["current"] == [str(Path(zoo.__file__).parent)]  # the installed zoo
    (baseline,) = against["zoo_folders"]["baseline"]
    assert Path(baseline).parts[-2:] == ("pkg", "zoo")
    (row,) = against["rows"]
    assert row["current_images_per_s"] > 0 and row["baseline_images_per_s"] > 0
    assert row["ratio"] == row["current_images_per_s"] / row["baseline_images_per_s"]
    assert [row["method"] for row in result["rows"]] == ["gradcam"]
