"""The end-to-end demo (``zoo-demo --quick``) on Fashion-MNIST files laid out as the Debian package ships them."""

import json
from pathlib import Path

from data_layouts import make_fashion_mnist

from evaluation.demo import main


def test_quick_demo_runs_end_to_end_and_its_summary_copies_the_results(tmp_path):
    make_fashion_mnist(tmp_path / "fashion-mnist", train=64, test=16)
    out = tmp_path / "demo"
    main(["--quick", "--out", str(out), "--data", str(tmp_path / "fashion-mnist")])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"gap", "castream", "cifar_baseline", "cifar_denoised"}
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
        assert "model-index" in card
        gradcam = entry["methods"]["gradcam"]
        assert f"| gradcam | {gradcam['AD']:.2f} | {gradcam['AG']:.2f} |" in table, name
    assert "attention" in summary["models"]["castream"]["methods"]
    assert {"SP", "EP", "BA"} <= summary["models"]["castream"]["methods"]["attention"].keys()
    assert 0 < summary["pointing_chance"] < 100
    # a second run reuses every finished stage and rewrites the same numbers
    main(["--quick", "--out", str(out), "--data", str(tmp_path / "fashion-mnist")])
    assert json.loads((out / "summary.json").read_text())["models"] == summary["models"]
