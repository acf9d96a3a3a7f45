"""Bad input to zoo-publish and zoo-card: refused naming the field, with no file lost, none written outside the
card's folder, and no number published that was measured on other weights or is not finite."""

import json
import math
import re
from pathlib import Path

import pytest
from test_model_cards import write_results
from test_publish import REPO, results_of, save_checkpoint

from zoo.evaluation import model_card, publish

REPOSITORY_CARDS = Path(__file__).resolve().parents[1] / "model_cards"

CARD = "resnet18_castream.in1k"  # a registered tag (1000 classes): its card needs no config.json
KEPT = "resnet18_castream.cub"  # a checkpoint's card kept by zoo-publish --cards, config.json included
MARKER = ".zoo-card"
BAD_NAMES = ["", ".", "..", "../runs/model", "a/../b", "/abs", "my card", "dash-", "dot.", "a--b", "a..b", "x" * 97]


def files(root):
    """Every file under ``root``, hidden ones too, with its contents."""
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The working directory, a project root: README.md, .git, a checkpoint in runs/model, and model_cards holding
    a registered tag's card and a card kept by zoo-publish --cards."""
    root = tmp_path / "project"
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "README.md").write_text("# the project\n")
    (root / "model_cards" / CARD).mkdir(parents=True)
    (root / "model_cards" / "README.md").write_text("# Model cards\n")
    (root / "model_cards" / CARD / "README.md").write_text("---\nlibrary_name: timm\n---\n# card\n")
    (root / "model_cards" / CARD / MARKER).write_text("written by zoo-card\n")
    save_checkpoint(root / "runs" / "model")
    monkeypatch.chdir(root)
    publish.main(["runs/model", KEPT, "--out", str(tmp_path / "kept_hub"), "--dry-run", "--cards", "model_cards"])
    return root


def rewritten(path, change):
    """The results file at ``path`` after ``change`` (a function editing its contents)."""
    results = json.loads(path.read_text())
    change(results)
    path.write_text(json.dumps(results))
    return path


def add_results(tool, results, tmp_path):
    """Give ``results`` to zoo-publish (for the project's checkpoint) or zoo-card (for the card it kept)."""
    if tool == "zoo-publish":
        publish.main(["runs/model", REPO, "--results", str(results), "--out", str(tmp_path / "a" / "b" / "hub"),
                      "--dry-run"])
    else:
        model_card.main([KEPT, "--results", str(results), "--root", "model_cards"])


@pytest.mark.parametrize("tag", BAD_NAMES)
def test_a_bad_repository_tag_is_refused_and_no_file_is_lost(tmp_path, project, tag):
    before = files(project)
    with pytest.raises(ValueError, match=r"^repository (organisation|name) '.*' is refused"):
        publish.main(["runs/model", tag, "--out", str(tmp_path / "hub"), "--dry-run", "--cards", "model_cards"])
    assert files(project) == before and not (tmp_path / "hub").exists()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_bad_card_name_is_refused_and_nothing_is_written(project, name):
    before = files(project)
    with pytest.raises(ValueError, match=r"^card name '.*' is refused"):
        model_card.main([name, "--root", "model_cards"])
    assert files(project) == before


@pytest.mark.parametrize("cwd, out", [
    (".", "mine"),  # a folder of someone's files
    (".", "README.md"),  # a file
    (".", "."),  # the working directory
    (f"model_cards/{CARD}", "."),  # the working directory, although zoo created it
    (f"model_cards/{CARD}", ".."),  # a parent
])
def test_overwrite_replaces_no_folder_zoo_did_not_create_nor_the_working_directory(project, monkeypatch, cwd, out):
    (project / "mine").mkdir()
    (project / "mine" / "notes.txt").write_text("mine\n")
    monkeypatch.chdir(project / cwd)
    before = files(project)
    with pytest.raises(FileExistsError, match=rf"^--out {re.escape(out)} "):
        publish.main([str(project / "runs" / "model"), REPO, "--out", out, "--dry-run", "--overwrite"])
    assert files(project) == before


def test_a_kept_card_folder_zoo_did_not_create_is_not_replaced(tmp_path, project):
    (project / "model_cards" / KEPT / MARKER).unlink()  # as if made by hand
    before = files(project)
    with pytest.raises(FileExistsError, match=rf"^--cards model_cards/{re.escape(KEPT)} "):
        publish.main(["runs/model", KEPT, "--out", str(tmp_path / "hub"), "--dry-run", "--cards", "model_cards"])
    assert files(project) == before and not (tmp_path / "hub").exists()


def test_the_cards_zoo_wrote_stay_replaceable(tmp_path, project):
    assert all((folder / MARKER).is_file() for folder in REPOSITORY_CARDS.iterdir() if folder.is_dir())
    for name in (KEPT, CARD):  # kept by zoo-publish, or written by zoo-card --all
        publish.main(["runs/model", name, "--out", str(tmp_path / name), "--dry-run", "--cards", "model_cards"])
        assert files(project / "model_cards" / name) == {
            path: content for path, content in files(tmp_path / name).items() if path != "model.safetensors"}


@pytest.mark.parametrize("tool", ["zoo-publish", "zoo-card"])
@pytest.mark.parametrize("field", ["protocol.dataset", "key"])
@pytest.mark.parametrize("value", ["../../escape", "../../../../escape", "sub/escape"])
def test_a_results_file_cannot_write_outside_the_results_folder(tmp_path, project, tool, field, value):
    results = results_of(project / "runs" / "model", tmp_path / "runs")
    rewritten(results, lambda r: (r["protocol"] if field == "protocol.dataset" else r).update(
        {field.split(".")[-1]: value}))
    before = files(tmp_path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(results))}: {field} '{re.escape(value)}' is refused"):
        add_results(tool, results, tmp_path)
    assert files(tmp_path) == before


def test_a_link_out_of_the_cards_folder_is_not_followed(tmp_path, project):
    (project / "model_cards" / "linked").symlink_to(project / "runs" / "model")  # a card folder linked elsewhere
    results = results_of(project / "runs" / "model", tmp_path / "runs")
    stored = project / "model_cards" / KEPT / "results" / f"cub-{json.loads(results.read_text())['key']}.json"
    stored.parent.mkdir()
    stored.symlink_to(tmp_path / "outside.json")  # a stored results file linked elsewhere
    before = files(tmp_path)
    with pytest.raises(ValueError, match=r"^card name 'linked' is refused: .* outside model_cards$"):
        model_card.main(["linked", "--root", "model_cards"])
    named = re.escape(str(results))
    with pytest.raises(ValueError, match=rf"^{named}: stored as .* outside model_cards/{KEPT}/results$"):
        add_results("zoo-card", results, tmp_path)
    assert files(tmp_path) == before and not (tmp_path / "outside.json").exists()


STALE = [  # a change to a results file of the checkpoint, and what its refusal says
    pytest.param(lambda r: r["protocol"].pop("weights_sha256"), "does not record .*re-run zoo-eval", id="no hash"),
    pytest.param(lambda r: r["protocol"].update(weights_sha256=None), "does not record .*re-run zoo-eval",
                 id="hash None"),
    pytest.param(lambda r: r["protocol"].update(weights_sha256="f" * 64), "was measured on other weights",
                 id="other weights"),
    pytest.param(lambda r: r["protocol"].update(num_classes=5), "num_classes 5, the checkpoint has 3",
                 id="other class count"),
    pytest.param(lambda r: r["recognition"].update(top1=math.nan), "recognition top1 = nan, not a finite number",
                 id="NaN accuracy"),
    pytest.param(lambda r: r["methods"]["gradcam"].update(AD=math.inf), "gradcam AD = inf, not a finite number",
                 id="Inf average drop"),
    pytest.param(lambda r: r["methods"]["attention"].update(I=-math.inf), "attention I = -inf, not a finite number",
                 id="-Inf insertion"),
    pytest.param(lambda r: r["methods"]["attention"].update(D="0.5"), "attention D = '0.5', not a finite number",
                 id="text deletion"),
]


@pytest.mark.parametrize("tool", ["zoo-publish", "zoo-card"])
@pytest.mark.parametrize("change, message", STALE)
def test_stale_or_non_finite_results_are_refused(tmp_path, project, tool, change, message):
    results = rewritten(results_of(project / "runs" / "model", tmp_path / "runs"), change)
    before = files(tmp_path)
    with pytest.raises(ValueError, match=f"^{re.escape(str(results))} .*{message}"):
        add_results(tool, results, tmp_path)
    assert files(tmp_path) == before


def test_results_of_the_checkpoint_are_accepted_by_both_tools(tmp_path, project):
    results = results_of(project / "runs" / "model", tmp_path / "runs")
    for tool in ("zoo-publish", "zoo-card"):
        add_results(tool, results, tmp_path)
    stored = f"results/cub-{json.loads(results.read_text())['key']}.json"
    assert (tmp_path / "a" / "b" / "hub" / stored).is_file() and (project / "model_cards" / KEPT / stored).is_file()


def test_a_registered_tag_refuses_results_of_another_class_count(tmp_path, project):
    results = write_results(tmp_path / "runs", weights="default", num_classes=3)
    before = files(project)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(results))} .*num_classes 3, the checkpoint has 1000"):
        model_card.main([CARD, "--results", str(results), "--root", "model_cards"])
    assert files(project) == before


def test_a_stored_non_finite_number_is_refused_when_the_card_is_regenerated(tmp_path, project):
    add_results("zoo-card", results_of(project / "runs" / "model", tmp_path / "runs"), tmp_path)
    (stored,) = (project / "model_cards" / KEPT / "results").glob("*.json")
    rewritten(stored, lambda r: r["methods"]["gradcam"].update(D=math.nan))
    before = files(project)
    named = re.escape(str(stored.relative_to(project)))  # zoo-card names it from its --root
    with pytest.raises(ValueError, match=rf"^{named} reports gradcam D = nan, not a finite number"):
        model_card.main([KEPT, "--root", "model_cards"])
    assert files(project) == before
