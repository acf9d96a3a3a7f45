"""The end-to-end demo (``examples/demo.py --quick``) on Fashion-MNIST files laid out as the Debian package ships,
and the experiment behind its stream's lr; both on the library's public API only."""

import csv
import json
from pathlib import Path

import pytest
from data_layouts import make_fashion_mnist
from scripts import load_script

demo = load_script("examples/demo.py")
main, localisation_bar = demo["main"], demo["localisation_bar"]


def test_quick_demo_runs_end_to_end_and_its_summary_copies_the_results(tmp_path):
    make_fashion_mnist(tmp_path / "fashion-mnist", train=64, test=16)
    out = tmp_path / "demo"
    main(["--quick", "--out", str(out), "--data", str(tmp_path / "fashion-mnist")])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"gap", "simpool", "castream", "cifar_baseline", "cifar_denoised"}
    for figure in summary["figures"]:
        assert (out / figure).stat().st_size > 0
    table = (out / "summary.md").read_text()
    for name, entry in summary["models"].items():
        results = json.loads(Path(entry["results"]).read_text())
        assert entry["recognition"] == results["recognition"] and entry["images"] == results["images"]
        assert entry["methods"] == {method: {k: v for k, v in values.items() if k != "seconds_per_image"}
                                    for method, values in results["methods"].items()}
        assert entry["reloaded_identical"] and (Path(entry["hub_folder"]) / "model.safetensors").exists()
        card = (Path(entry["hub_folder"]) / "README.md").read_text()
        # 64 images or fewer: reported in the card's tables, marked, and kept out of its metadata's model-index
        assert "model-index" not in card.split("---")[1]
        assert f"measured on {results['images']} images, below the minimum 1000 for a reported figure" in card
        gradcam = entry["methods"]["gradcam"]
        assert f"| gradcam | {gradcam['AD']:.2f} | {gradcam['AG']:.2f} |" in table, name
    assert "attention" in summary["models"]["castream"]["methods"]
    assert {"SP", "EP", "BA"} <= summary["models"]["castream"]["methods"]["attention"].keys()
    for label, name in (("GAP", "gap"), ("SimPool", "simpool"), ("CA-Stream", "castream")):
        row, methods = summary["pooling"][label], summary["models"][name]["methods"]
        assert row["top1"] == summary["models"][name]["recognition"]["top1"]
        assert row["Grad-CAM AD"] == methods["gradcam"]["AD"]
        assert row["built-in SP"] == (methods["attention"]["SP"] if name != "gap" else None)
    sanity = summary["sanity_check"]
    measured = json.loads(Path(sanity["results"]).read_text())["methods"]
    assert set(sanity["methods"]) == {"gradcam", "guided_backprop", "gradient"}
    for method, values in sanity["methods"].items():
        assert values == {key: measured[method][key] for key in ("MPRT", "MPRT-SSIM", "IMPRT", "IMPRT-SSIM", "eMPRT")}
    assert sanity["separates"] == (measured["gradcam"]["MPRT"] < measured["guided_backprop"]["MPRT"])
    assert f"| gradcam | {measured['gradcam']['MPRT']:.2f} |" in table
    bar = summary["attention_localises"]
    assert bar["SP"] == summary["models"]["castream"]["methods"]["attention"]["SP"] and 0 < bar["chance"] < 100
    assert f"points into the box on {bar['SP']:.2f} %" in table
    # a second run reuses every finished stage and rewrites the same numbers
    main(["--quick", "--out", str(out), "--data", str(tmp_path / "fashion-mnist")])
    assert json.loads((out / "summary.json").read_text())["models"] == summary["models"]

    # the experiment behind the demo's stream lr, on the quick demo's GAP model
    experiment = load_script("experiments/castream_attention.py")
    attention = tmp_path / "attention"
    experiment["main"](["--gap", str(out / "runs" / "gap" / "model"), "--lrs", "0.01", "0.001",
                        "--images", "8", "--data", str(tmp_path / "fashion-mnist"), "--out", str(attention)])
    results = json.loads((attention / "results.json").read_text())
    assert [run["lr"] for run in results["runs"]] == [0.01, 0.001] and 0 < results["chance"] < 100
    for run in results["runs"]:
        assert len(run["stages"]) == 5 and all(0 <= stage["SP"] <= 100 and 0 < stage["entropy"] <= 1 + 1e-6
                                               for stage in run["stages"])
        assert run["val_top1"] == float(list(csv.DictReader(
            (attention / "runs" / f"lr{run['lr']:g}" / "metrics.csv").open()))[-1]["val_top1"])
    # at the demo's own lr the stream is the demo's, so its last stage points as the demo's built-in attention did
    # on the same 8 canvases (in percent, as the harness reports it)
    demo_attention = summary["models"]["castream"]["methods"]["attention"]["SP"]
    assert results["runs"][1]["stages"][-1]["SP"] == pytest.approx(demo_attention)
    assert set(results["probe"]) == {"all positions (GAP)", "inside the box", "outside the box"}
    assert all(0 <= probe["top1"] <= 100 and probe["feature_norm"] >= 0 for probe in results["probe"].values())
    assert (attention / "attention_by_lr.png").stat().st_size > 0
    assert f"| 0.01 | {results['runs'][0]['val_top1']:.2f} |" in (attention / "results.md").read_text()
    assert results["chance"] == bar["chance"]  # the same 8 test canvases
    # the streams are trained with the demo's own stream recipe: only the lr (and the run's name and folder) differ
    demo_recipe = json.loads((out / "runs" / "castream" / "recipe.json").read_text())
    for lr in (0.01, 0.001):
        run = attention / "runs" / f"lr{lr:g}"
        recipe = json.loads((run / "recipe.json").read_text())
        assert recipe == {**demo_recipe, "name": run.name, "output_dir": str(run), "lr": lr}


def test_quality_bar_is_chance_plus_three_standard_errors():
    assert localisation_bar(40.0, 20.0, 100) == {"SP": 40.0, "chance": 20.0, "margin": pytest.approx(12.0),
                                                  "images": 100, "holds": True}
    assert not localisation_bar(31.0, 20.0, 100)["holds"] and localisation_bar(32.5, 20.0, 100)["holds"]
