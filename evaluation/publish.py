"""Publish a checkpoint on the Hugging Face Hub with a model card of its measured results.

    zoo-publish runs/castream_imagenet/model resnet50_castream.in1k --results results/eval/<key>/results.json
    zoo-publish runs/castream_cub/model someone/resnet50_castream.cub --results ... --out hub/cub --dry-run

From a checkpoint folder (a training run's ``model/``, or any folder with ``model.safetensors`` and timm's
``config.json``, checked by ``zoo.hub.verify_checkpoint``) and ``zoo-eval`` results files, it builds the Hub
folder: ``model.safetensors``, ``config.json`` (timm's format: ``architecture``, ``num_classes``,
``label_names``, ``pretrained_cfg`` pinned to the safetensors file, ``model_args``, and the weights' SHA-256),
the card ``README.md`` and its ``results/`` (numbers and example maps). Both describe the run that produced the
weights, as zoo-train records it in ``config.json`` (``training``), not the architecture's default tag:
``pretrained_cfg.tag`` is the published name's, and a checkpoint without that record claims no licence or
training notes. Then it creates the repository if
needed and uploads the folder in one commit, which also removes earlier results files and any pickled
weights from the repository. The token is huggingface_hub's own (``HF_TOKEN`` or ``hf auth login``); this
command never reads, prints or writes it. ``--dry-run`` builds the folder only.

The card's metrics are exactly those of the results given, each refused unless measured on these very weights:
the SHA-256 of the safetensors file ``zoo-eval`` evaluated (``protocol.weights_sha256``; results from before it
recorded one must be measured again) is that of ``model.safetensors``, the class count (``protocol.num_classes``)
is the checkpoint's, and every number is finite. Everything else on an existing card (the Hub's, or the output
folder's) stays: front-matter keys the generator does not write, extra tags, ``base_model``.

The repository's organisation and name follow the Hub's rules (letters, digits, ``-``, ``_``, ``.``; checked by
huggingface_hub) before anything is written. A folder is only ever replaced when it is empty or was created by
this command or ``zoo-card`` (it holds their marker ``.zoo-card``, which is not uploaded), never the working
directory or one above it: an output folder that is not empty with ``--overwrite`` only, ``CARDS/<name>``
always.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError

from zoo.hub import (
    CONFIG_FILE,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
    CheckpointError,
    hub_id,
    read_config,
    sha256,
    verify_checkpoint,
)

from .model_card import (
    CARD_MARKER,
    add_results,
    check_replaceable,
    check_tag_claim,
    create_card_folder,
    inside,
    safe_name,
    write_card,
)

__all__ = ["build_hub_folder", "main"]


def hub_config(config: dict, weights: Path, name: str) -> dict:
    """The checkpoint's timm config, pinned to ``model.safetensors``, recording its SHA-256 and tagged as ``name``
    (``<arch>.<tag>``) says; without the record of a zoo-train run (``training``) its ``pretrained_cfg`` claims no
    licence and no training notes, which timm copied from the architecture's default tag."""
    if "pretrained_cfg" not in config:
        raise CheckpointError(f"{CONFIG_FILE} is not in timm's current format (no pretrained_cfg): save the model "
                              "with timm.models.save_for_hf")
    if not config.get("label_names"):
        raise CheckpointError(f"{CONFIG_FILE} has no label_names (a training run's model/ has them; otherwise save "
                              "with save_for_hf(model, folder, model_config=dict(label_names=[...])))")
    unclaimed = ("tag",) if config.get("training") else ("tag", "license", "notes")
    pretrained_cfg = {key: value for key, value in config["pretrained_cfg"].items() if key not in unclaimed}
    tag = name.partition(".")[2]
    return {**config, "model_args": config.get("model_args", {}),
            "pretrained_cfg": {**pretrained_cfg, **({"tag": tag} if tag else {}), "hf_hub_filename": WEIGHTS_FILE},
            "weights_sha256": sha256(weights)}


def build_hub_folder(model_dir: Path, out: Path, name: str, results: list[Path], repo_id: str,
                     base_model: str | None = None, existing: ModelCard | None = None) -> ModelCard:
    """Write the Hub folder of checkpoint ``name`` into ``out`` (which must not exist); returns its card."""
    config = verify_checkpoint(model_dir)
    check_tag_claim(name, config.get("training"))
    create_card_folder(out, exist_ok=False)
    shutil.copyfile(model_dir / WEIGHTS_FILE, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(hub_config(config, out / WEIGHTS_FILE, name), indent=2) + "\n")
    add_results(out, results, name)
    card = write_card(out, name, repo_id=repo_id, base_model=base_model, existing=existing)
    verify_checkpoint(out)
    return card


def _remove(folder: Path, option: str) -> None:
    """Delete ``folder``, if any, to put a new one there; ``check_replaceable`` is asked again, as uploading may have
    taken minutes."""
    check_replaceable(folder, option)
    if folder.exists():
        shutil.rmtree(folder)


def _hub_card(api: HfApi, repo_id: str) -> ModelCard | None:
    try:
        return ModelCard.load(api.hf_hub_download(repo_id, "README.md"))
    except EntryNotFoundError:
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="zoo-publish", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="folder with model.safetensors and timm's config.json")
    parser.add_argument("repo", help="<arch>.<tag> (in the zoo's organisation) or org/name; its last part names "
                                     "the card")
    parser.add_argument("--results", nargs="+", type=Path, default=[], help="zoo-eval results.json files")
    parser.add_argument("--out", type=Path, help="where to build the Hub folder (default: a temporary folder)")
    parser.add_argument("--dry-run", action="store_true", help="build the folder, upload nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace what --out holds (its card's metadata "
                                                                 "is kept)")
    parser.add_argument("--base-model", help="Hub id of the checkpoint training started from")
    parser.add_argument("--cards", type=Path, help="also keep the card (all but the weights) in CARDS/<name>, "
                                                   "e.g. the repository's model_cards (zoo organisation only)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    args = parser.parse_args(argv)
    if args.dry_run and args.out is None:
        parser.error("--dry-run needs --out")
    repo_id = args.repo if "/" in args.repo else hub_id(args.repo)
    organisation, _, name = repo_id.partition("/")
    safe_name(organisation, "repository organisation")
    safe_name(name, "repository name")
    if args.cards is not None and repo_id != hub_id(name):
        parser.error(f"--cards keeps cards of {hub_id('<name>')} only: a kept card names its repository so")
    kept = None if args.cards is None else inside(args.cards, name, "repository name")
    training = read_config(args.model_dir).get("training")  # before the Hub is touched
    try:
        check_tag_claim(name, training)
    except ValueError as error:
        parser.error(str(error))
    out = args.out
    for folder, option in ((kept, "--cards"), (out, "--out")):
        if folder is not None:
            check_replaceable(folder, option)
    if out is not None and out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} is not empty: --overwrite replaces it (keeping its card's metadata)")

    api = None if args.dry_run else HfApi()
    if api is not None:
        repo_id = api.create_repo(repo_id, exist_ok=True, private=args.private).repo_id
    existing = _hub_card(api, repo_id) if api is not None else None
    if existing is None and out is not None and (out / "README.md").is_file():
        existing = ModelCard.load(out / "README.md")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=None if out is None else out.parent) as staging:
        built = Path(staging) / "hub"
        build_hub_folder(args.model_dir, built, name, args.results, repo_id, args.base_model, existing)
        if api is not None:
            commit = api.upload_folder(repo_id=repo_id, folder_path=built, commit_message=f"Publish {name}",
                                       ignore_patterns=[CARD_MARKER],
                                       delete_patterns=["results/*", *(f"*{suffix}" for suffix in PICKLE_SUFFIXES)])
            print(f"published {commit.commit_url}")
        if kept is not None:
            _remove(kept, "--cards")
            shutil.copytree(built, kept, ignore=shutil.ignore_patterns(WEIGHTS_FILE))
            print(f"card kept in {kept}")
        if out is not None:
            _remove(out, "--out")
            built.rename(out)
            print(f"Hub folder in {out}")


if __name__ == "__main__":
    main()
