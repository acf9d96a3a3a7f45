"""``zoo-app``: the explorer's page, drawn with Gradio (``pip install -e '.[app]'``; ``make app``).

    zoo-app [--model NAME] [--demo results/demo] [--port 7860]

A model by any name timm takes, an uploaded or example image, its top-5 classes and built-in saliency, the maps of
the methods ticked with their scores on this image. Slow work waits in a queue, one job at a time, with its progress
shown; other requests (loading a model, the top-5 and built-in maps) do not wait behind it. Everything computed
is ``explorer.py``'s.
"""

import argparse
import functools
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry, no version check

try:
    import gradio as gr
except ImportError:  # the app is an optional extra
    raise SystemExit("zoo-app needs Gradio: pip install -e '.[app]' (or make app)") from None

from .explorer import (
    METHOD_GROUPS,
    PREDICTED,
    AppError,
    box_from_file,
    box_text,
    builtin_maps,
    curves_figure,
    default_model,
    demo_models,
    example_inputs,
    explain_and_score,
    load,
    method_choices,
    overlay_picture,
    parse_box,
    prepare,
    read_image,
    scores_table,
    target_index,
    top_classes,
)
from .explorer import label as map_label

MAX_UPLOAD = "25mb"
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],  # no web fonts: the page works offline
                          font_mono=["ui-monospace", "monospace"])


def _said(function):
    """``function`` with the user's mistakes (AppError) shown on the page as a message, never a traceback (its
    signature kept: Gradio reads it for the progress tracker)."""
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except AppError as error:
            raise gr.Error(str(error), print_exception=False) from None
    return wrapped


@_said
def load_model(name: str, random_weights: bool):
    """Load a model: its description, the methods offered for it and its classes for the target menu."""
    loaded = load(name, bool(random_weights))
    methods = method_choices(loaded)
    return (loaded.describe(), gr.update(choices=methods, value=[m for m in ("gradcam", "opticam") if m in methods]),
            gr.update(choices=[PREDICTED, *loaded.classes], value=PREDICTED))


def _inputs(name, random_weights, image_path, box):
    if not image_path:
        raise AppError("upload an image, or pick an example below it")
    loaded = load(name, bool(random_weights))
    return loaded, prepare(loaded, read_image(image_path), parse_box(box))


@_said
def classify(name: str, random_weights: bool, image_path: str | None, box: str, probabilities: str = "softmax"):
    """Top-5 classes and the built-in maps: quick, so never queued behind an explanation."""
    loaded, prepared = _inputs(name, random_weights, image_path, box)
    top, _ = top_classes(loaded, prepared, probabilities=probabilities)
    gallery = [(overlay_picture(prepared.pixels, heatmap, prepared.box), caption)
               for caption, heatmap in builtin_maps(loaded, prepared)]
    return top, gallery


@_said
def explain_methods(name: str, random_weights: bool, image_path: str | None, box: str, probabilities: str,
                    methods: list[str], target: str, iterations: float,
                    progress=gr.Progress()):  # noqa: B008  (Gradio's convention)
    """The ticked methods' maps for the chosen class, their scores and their insertion / deletion curves."""
    loaded, prepared = _inputs(name, random_weights, image_path, box)
    explained = explain_and_score(loaded, prepared, methods or [], target_index(loaded, target), int(iterations),
                                  progress=lambda fraction, what: progress(fraction, desc=what),
                                  probabilities=probabilities)
    gallery = [(overlay_picture(prepared.pixels, heatmap, prepared.box), map_label(method))
               for method, heatmap in explained.maps.items()]
    title = f"### Scores for class **{loaded.classes[explained.target]}**\n\n"
    return gallery, title + scores_table(explained), curves_figure(explained)


@_said
def corner(box: str, event: gr.SelectData) -> str:
    """Draw a box with two clicks on the image: the first click starts it, the second closes it."""
    x, y = event.index[:2]
    numbers = [value.strip() for value in (box or "").split(",") if value.strip()]
    return f"{x}, {y}" if len(numbers) != 2 else box_text(parse_box(f"{box}, {x}, {y}"))


def checked_upload(payload: dict | None):
    """An upload that is not an image this app can read, or too large, is cleared with a message saying why. Gets
    the raw upload (``preprocess=False``): Gradio's own preprocessing would fail on it without saying why."""
    if payload and payload.get("path"):
        try:
            read_image(payload["path"])
        except AppError as error:
            gr.Warning(str(error))
            return None
    return gr.update()


@_said
def uploaded_box(path: str | None, box: str) -> str:
    return box if not path else box_from_file(path)


def build(model: str, random: bool, demo: Path, examples: Path) -> gr.Blocks:
    models = demo_models(demo)
    samples = example_inputs(examples)
    first_image, first_box = samples[0]  # the first screen shows an image, ready to explain
    with gr.Blocks(title="interpretable-zoo explorer") as page:
        gr.Markdown("# interpretable-zoo explorer\nA model's prediction, its built-in saliency and the maps of "
                    "post-hoc methods side by side on one image, each with its faithfulness on that image.")
        with gr.Row():
            name = gr.Dropdown(models or [model], value=model, allow_custom_value=True, scale=4, elem_id="model",
                               label="model: a timm name, <arch>.<tag>, local-dir:<folder> or hf-hub:<org>/<name>")
            random_weights = gr.Checkbox(label="random weights", value=random, elem_id="random", scale=1)
            load_button = gr.Button("Load", elem_id="load", scale=1)
        description = gr.Markdown(elem_id="description")
        with gr.Row():
            with gr.Column():
                image = gr.Image(first_image, type="filepath", image_mode=None, elem_id="image", height=320,
                                 label="image (click two corners to draw a box)", sources=["upload", "clipboard"])
                box = gr.Textbox(first_box, label="box x0, y0, x1, y1 (pixels of the image): for the pointing games",
                                 elem_id="box", placeholder="optional")
                box_file = gr.File(label="or upload a box (a text file of four numbers)", file_types=["text"],
                                   height=80)
                gr.Examples([list(example) for example in samples], [image, box],
                            example_labels=[Path(path).stem.replace("_", " ") + (" (with its box)" if box_ else "")
                                            for path, box_ in samples],
                            label="examples: the demo's canvases and matplotlib's photographs")
            with gr.Column():
                methods = gr.CheckboxGroup([m for group in METHOD_GROUPS.values() for m in group], elem_id="methods",
                                           label="post-hoc methods (the built-in saliency is always scored)")
                iterations = gr.Slider(0, 300, value=100, step=10, label="Opti-CAM iterations", elem_id="iterations")
                target = gr.Dropdown([PREDICTED], value=PREDICTED, label="class explained", elem_id="target")
                probabilities = gr.Radio(["softmax", "sigmoid"], value="softmax", elem_id="probabilities",
                                         label="class probability: softmax, or sigmoid for a multi-label model")
                explain_button = gr.Button("Explain", variant="primary", elem_id="explain")
                top5 = gr.Label(num_top_classes=5, label="top-5 classes", elem_id="top5")
        gallery = dict(columns=5, fit_columns=False, object_fit="contain", height=290)
        builtin = gr.Gallery(label="built-in saliency (a CA-Stream's attention at every stage)", elem_id="builtin",
                             **gallery)
        maps = gr.Gallery(label="post-hoc maps (and the built-in one, scored)", elem_id="maps", **gallery)
        scores = gr.Markdown(elem_id="scores")
        curves = gr.Plot(label="insertion and deletion curves", elem_id="curves")

        model_inputs = [name, random_weights]
        page.load(load_model, model_inputs, [description, methods, target])
        load_button.click(load_model, model_inputs, [description, methods, target], concurrency_id="quick",
                          concurrency_limit=4)
        image.upload(checked_upload, image, image, preprocess=False)
        image.select(corner, box, box)
        box_file.upload(uploaded_box, [box_file, box], box)
        image_inputs = [*model_inputs, image, box, probabilities]
        explain_button.click(
            classify, image_inputs, [top5, builtin], concurrency_id="quick", concurrency_limit=4,
        ).success(
            explain_methods, [*image_inputs, methods, target, iterations], [maps, scores, curves],
            concurrency_id="slow", concurrency_limit=1,
        )
    return page


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("results/demo"),
                        help="the demo's output folder: its models are offered, its CA-Stream first")
    parser.add_argument("--model", help="the model shown first (default: the demo's CA-Stream, else "
                                        "resnet18_castream with random weights)")
    parser.add_argument("--random-weights", action="store_true", help="--model at a random initialisation")
    parser.add_argument("--examples", type=Path, default=Path("results/app/examples"),
                        help="where the example images are written")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    model, random = (args.model, args.random_weights) if args.model else default_model(args.demo)
    page = build(model, random, args.demo, args.examples)
    page.queue(max_size=64).launch(server_name=args.host, server_port=args.port, ssr_mode=False, theme=THEME,
                                   max_file_size=MAX_UPLOAD, allowed_paths=[str(args.examples.resolve())],
                                   footer_links=[])


if __name__ == "__main__":
    main()
