"""The explorer's functions (zoo.app.explorer, and the page's handlers in zoo.app.ui), called directly: models by
every kind of name, uploads good and bad, boxes that follow the crop, and scores that are the library's metrics."""

import json
import time

import numpy as np
import pytest
import timm
import torch
from app_fixtures import ARGS, CLASSES, served_app, tiny_checkpoint
from matplotlib import cbook
from PIL import Image

import zoo
from zoo.app.explorer import (
    MAX_PIXELS,
    PREDICTED,
    AppError,
    box_from_file,
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
from zoo.evaluation.metrics import perturbation_curves
from zoo.evaluation.saliency import explain, mask_images, pixel_statistics
from zoo.hub import add_to_hf_cache


@pytest.fixture(scope="module")
def castream(tmp_path_factory):
    folder = tmp_path_factory.mktemp("castream") / "model"
    tiny_checkpoint(folder, **ARGS)
    return load(f"local-dir:{folder}")


@pytest.fixture(scope="module")
def canvas_image(tmp_path_factory):
    """A 120x80 RGB photograph-like image: a bright square on a gradient."""
    ramp = np.linspace(0, 255, 120, dtype=np.uint8)[None, :, None].repeat(80, 0).repeat(3, 2)
    ramp[20:60, 50:90] = (250, 40, 40)
    return Image.fromarray(ramp)


def test_a_checkpoint_folder_loads_with_its_classes_arguments_and_input_size(castream, tmp_path):
    assert castream.architecture == "resnet18_castream" and castream.classes == CLASSES
    assert castream.data_config["input_size"] == (3, 64, 64) and castream.warning is None
    assert castream.model.backbone.layer1[0].conv1.out_channels == 8 and not castream.model.training
    assert "3 classes" in castream.describe() and "64x64" in castream.describe()
    assert demo_models(tmp_path) == [] and default_model(tmp_path) == ("resnet18_castream", True)
    (tmp_path / "hub").mkdir()
    tiny_checkpoint(tmp_path / "hub" / "resnet18_castream.fmnist_demo_castream", **ARGS)
    tiny_checkpoint(tmp_path / "hub" / "resnet18_cifar.fmnist_demo_cifar", "resnet18_cifar")
    name = f"local-dir:{(tmp_path / 'hub' / 'resnet18_castream.fmnist_demo_castream').resolve()}"
    assert default_model(tmp_path) == (name, False) and len(demo_models(tmp_path)) == 2


def test_a_hub_checkpoint_loads_offline_from_the_cache(tmp_path):
    model = tiny_checkpoint(tmp_path / "model", **ARGS)
    add_to_hf_cache(tmp_path / "model", "someone/tiny-castream")
    loaded = load("hf-hub:someone/tiny-castream")
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded.model(x).logits, model(x).logits) and loaded.classes == CLASSES


def test_random_weights_are_said_and_bad_names_are_refused(castream):
    loaded = load("resnet18_castream", True)
    assert "random weights" in loaded.warning and "random weights" in loaded.describe()
    assert loaded.classes[0] == "tench"  # 1000 classes: ImageNet's names, from timm
    with pytest.raises(AppError, match="tick random weights"):  # its default weights are in no Hub cache here
        load("resnet101_castream")
    with pytest.raises(AppError, match="timm knows no model 'resnet18_castrem'"):
        load("resnet18_castrem", True)
    with pytest.raises(AppError, match="names weights"):
        load(castream.name, True)
    with pytest.raises(AppError, match="no folder"):
        load("local-dir:/nowhere")
    with pytest.raises(AppError, match="enter a model name"):
        load("  ")


def test_uploads_are_converted_or_refused_with_a_message(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(AppError, match="notes.png is not an image"):
        read_image(tmp_path / "notes.png")
    Image.new("L", (9000, 5000)).save(tmp_path / "huge.png")  # 45 megapixels
    assert 9000 * 5000 > MAX_PIXELS
    with pytest.raises(AppError, match="9000x5000 pixels; at most 40 megapixels"):
        read_image(tmp_path / "huge.png")
    Image.new("L", (30, 20), 128).save(tmp_path / "gray.png")
    gray = read_image(tmp_path / "gray.png")
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (128, 128, 128)
    rgba = Image.new("RGBA", (30, 20), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    rgba.save(tmp_path / "rgba.png")
    converted = read_image(tmp_path / "rgba.png")
    assert converted.mode == "RGB" and converted.getpixel((0, 0)) == (255, 255, 255)  # transparent: white
    assert converted.getpixel((1, 1)) == (0, 0, 255)


def test_boxes_are_parsed_read_from_files_and_refused_when_malformed(tmp_path):
    assert parse_box("") is None and parse_box(None) is None
    assert parse_box("90, 60 10 20.5") == [10.0, 20.5, 90.0, 60.0]  # corners in any order
    with pytest.raises(AppError, match="four numbers"):
        parse_box("1, 2, 3")
    with pytest.raises(AppError, match="no area"):
        parse_box("5, 5, 5, 40")
    (tmp_path / "box.txt").write_text("12 14 40 50\n")
    assert box_from_file(tmp_path / "box.txt") == "12, 14, 40, 50"
    (tmp_path / "box.bin").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(AppError, match="box.bin is not a text file"):
        box_from_file(tmp_path / "box.bin")


def test_the_box_follows_the_resize_and_centre_crop(castream, canvas_image):
    # 120x80 -> resized to 96x64 (short side 64) -> centre crop 64x64: x offset 16, scale 0.8
    prepared = prepare(castream, canvas_image, [50, 20, 90, 60])
    assert prepared.images.shape == (1, 3, 64, 64) and prepared.pixels.shape == (64, 64, 3)
    assert torch.allclose(prepared.box, torch.tensor([[50 * 0.8 - 16, 20 * 0.8, 90 * 0.8 - 16, 60 * 0.8]]))
    assert prepare(castream, canvas_image, [50, 20, 115, 60]).box[0, 2] == 64  # clipped to the crop
    assert 0 <= prepared.pixels.min() and prepared.pixels.max() <= 1
    with pytest.raises(AppError, match="outside the centre crop"):
        prepare(castream, canvas_image, [0, 0, 15, 80])


def test_top_classes_and_the_target(castream, canvas_image):
    prepared = prepare(castream, canvas_image)
    top, logits = top_classes(castream, prepared)
    assert list(top) == [CLASSES[i] for i in logits[0].argsort(descending=True)]
    assert sum(top.values()) == pytest.approx(1, abs=1e-5)
    sigmoid, _ = top_classes(castream, prepared, probabilities="sigmoid")  # a multi-label model's reading
    assert sigmoid == pytest.approx({name: torch.sigmoid(logits[0, i]).item() for i, name in enumerate(CLASSES)})
    assert target_index(castream, PREDICTED) is None and target_index(castream, "bag") == 2
    with pytest.raises(AppError, match="'hat' is not a class"):
        target_index(castream, "hat")
    assert explain_and_score(castream, prepared, [], None).target == int(logits.argmax())  # None: the prediction


def test_builtin_maps_are_every_stage_of_a_castream_a_simpools_attention_and_a_cifar_models_cam(castream,
                                                                                                 canvas_image):
    prepared = prepare(castream, canvas_image)
    stages = builtin_maps(castream, prepared)
    attentions = castream.model.forward_stream(prepared.images).attentions
    assert [caption for caption, _ in stages] == ["stage 0 (16x16)", "stage 1 (16x16)", "stage 2 (8x8)",
                                                  "stage 3 (4x4)", "stage 4, the saliency (2x2)"]
    for (_, heatmap), attention in zip(stages, attentions, strict=True):  # upsampled bilinearly, then min-max
        upsampled = torch.nn.functional.interpolate(attention[:, None], size=(64, 64), mode="bilinear")[0, 0]
        expected = (upsampled - upsampled.min()) / (upsampled.max() - upsampled.min())
        assert torch.allclose(heatmap, expected, atol=1e-5)
    cifar = zoo.ResNetCifar(num_classes=3).eval()
    loaded = type(castream)(cifar, "resnet18_cifar", "resnet18_cifar", castream.data_config, CLASSES, None)
    ((caption, cam),) = builtin_maps(loaded, prepared)
    assert caption == "built-in CAM of the predicted class" and cam.shape == (64, 64)
    simpool = zoo.SimPool("resnet18", num_classes=3).eval()
    loaded = type(castream)(simpool, "resnet18_simpool", "resnet18_simpool", castream.data_config, CLASSES, None)
    ((caption, attention),) = builtin_maps(loaded, prepared)
    expected = torch.nn.functional.interpolate(simpool.forward_pool(prepared.images).attention.mean(1, keepdim=True),
                                               size=(64, 64), mode="bilinear")[0, 0]
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    assert caption == "SimPool's attention (the same for every class)" and torch.allclose(attention, expected,
                                                                                          atol=1e-5)
    plain = type(castream)(timm.create_model("resnet18", num_classes=3).eval(), "resnet18", "resnet18",
                           castream.data_config, CLASSES, None)
    assert builtin_maps(plain, prepared) == []


def test_transformer_methods_are_offered_for_vision_transformers_only(castream, canvas_image):
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=3).eval()
    loaded = type(castream)(vit, "vit", "vit_tiny_patch16_224", castream.data_config, CLASSES, None)
    assert {"rawattention", "rollout", "tibav"} <= set(method_choices(loaded))
    assert "rollout" not in method_choices(castream) and "opticam" in method_choices(castream)
    explained = explain_and_score(loaded, prepare(loaded, canvas_image), ["rollout", "gradcam"], 0)
    assert list(explained.maps) == ["rollout", "gradcam"]  # no built-in map to score on a plain ViT
    assert torch.equal(explained.maps["rollout"], explain(vit, prepare(loaded, canvas_image).images, "rollout",
                                                          torch.tensor([0]))[0])


def test_scores_and_curves_are_the_librarys_metrics_on_the_image(castream, canvas_image):
    """Each term recomputed here from its definition: AD's relative drop, AG's relative gain, AI's increase from
    the probabilities on the image and on the image masked by the map, the curves' areas by the trapezoid rule,
    the pointing game from the map's maximum."""
    prepared = prepare(castream, canvas_image, [50, 20, 90, 60])
    model, x = castream.model, prepared.images
    seen = []
    explained = explain_and_score(castream, prepared, ["gradcam", "fakecam"], 1, iterations=3,
                                  progress=lambda fraction, what: seen.append((fraction, what)))
    assert list(explained.maps) == ["attention", "gradcam", "fakecam"]  # the built-in map is always scored
    assert explained.target == 1
    assert [what.split(" ")[0] for _, what in seen] == ["attention", "gradcam", "fakecam", "done"]
    target = torch.tensor([1])
    with torch.no_grad():
        p = model(x).logits.softmax(1)[0, 1].item()
    for method, heatmap in explained.maps.items():
        assert torch.equal(heatmap, explain(model, x, method, target)[0])
        masked = mask_images(x, heatmap[None], *pixel_statistics(model, x))
        with torch.no_grad():
            o = model(masked).logits.softmax(1)[0, 1].item()
        scores = explained.scores[method]
        assert scores["AD"] == pytest.approx(max(p - o, 0) / p, abs=1e-6)
        assert scores["AG"] == pytest.approx(max(o - p, 0) / (1 - p), abs=1e-6)
        assert scores["AI"] == float(p < o)
        curves = perturbation_curves(model, x, heatmap[None], target)
        insertion, deletion = explained.curves[method]
        assert insertion == pytest.approx(curves.insertion[0].tolist()) and len(insertion) == 29
        assert scores["I"] == pytest.approx(np.trapezoid(insertion, dx=1 / 28), abs=1e-6)
        assert scores["D"] == pytest.approx(np.trapezoid(deletion, dx=1 / 28), abs=1e-6)
        x0, y0, x1, y1 = prepared.box[0].tolist()
        centres = torch.arange(64) + 0.5
        inside = ((centres[:, None] >= y0) & (centres[:, None] < y1)) & ((centres >= x0) & (centres < x1))
        peaks = heatmap == heatmap.max()  # ties: a hit when any peak is inside (Quantus' convention)
        assert scores["SP"] == float((peaks & inside).any())
        total = heatmap.sum().item()  # an all-zero map (a random model's Grad-CAM can be one) has no energy
        assert scores["EP"] == pytest.approx((heatmap * inside).sum().item() / total if total else 0, abs=1e-6)
    assert explained.scores["fakecam"]["AD"] < 0.01  # Fake-CAM masks one pixel only
    table = scores_table(explained)
    assert "| built-in saliency |" in table and "| gradcam |" in table and "SP ↑" in table
    assert f"{100 * explained.scores['gradcam']['AD']:.2f}" in table
    on_sigmoid = explain_and_score(castream, prepared, ["gradcam"], 1, probabilities="sigmoid")
    masked = mask_images(x, explained.maps["gradcam"][None], *pixel_statistics(model, x))
    with torch.no_grad():
        p, o = torch.sigmoid(model(x).logits[0, 1]).item(), torch.sigmoid(model(masked).logits[0, 1]).item()
    assert on_sigmoid.scores["gradcam"]["AD"] == pytest.approx(max(p - o, 0) / p, abs=1e-6)
    without_box = explain_and_score(castream, prepare(castream, canvas_image), ["gradcam"], 1)
    assert set(without_box.scores["gradcam"]) == {"AD", "AG", "AI", "I", "D"}
    with pytest.raises(AppError, match="unknown saliency methods nosuch"):
        explain_and_score(castream, prepared, ["nosuch"], 1)
    with pytest.raises(AppError, match="rollout: .*timm attention blocks"):
        explain_and_score(castream, prepared, ["rollout"], 1)


def test_pictures_and_examples(castream, canvas_image, tmp_path):
    prepared = prepare(castream, canvas_image, [50, 20, 90, 60])
    heatmap = torch.zeros(64, 64)
    heatmap[:32] = 1
    picture = overlay_picture(prepared.pixels, heatmap, prepared.box, side=2.0)
    assert picture.shape == (200, 200, 3) and picture.dtype == np.uint8
    top, bottom = picture[:90].astype(int), picture[110:].astype(int)
    assert (top[..., 0] - top[..., 2]).mean() > (bottom[..., 0] - bottom[..., 2]).mean() + 50  # jet: red on top
    explained = explain_and_score(castream, prepared, ["fakecam"], 0)
    figure = curves_figure(explained)
    insertion_axes, deletion_axes = figure.axes
    assert [line.get_label() for line in insertion_axes.lines][1].startswith("fakecam (")
    assert np.allclose(deletion_axes.lines[1].get_ydata(), explained.curves["fakecam"][1])
    examples = example_inputs(tmp_path / "examples")
    photos = [path for path, box in examples if not box]
    assert [p.rsplit("/", 1)[1] for p in photos] == ["grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"]
    for path, box in examples:
        image = read_image(path)
        if box:  # a canvas: its box lies on it
            x0, y0, x1, y1 = parse_box(box)
            assert image.size == (96, 96) and 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
    assert example_inputs(tmp_path / "examples") == examples  # written once, then reused


def test_the_pages_handlers(castream, canvas_image, tmp_path):
    gr = pytest.importorskip("gradio", reason="the app's page needs the [app] extra (pip install -e '.[app]')")
    from zoo.app import ui

    canvas_image.save(tmp_path / "image.png")
    description, methods, target = ui.load_model(castream.name, False)
    assert "resnet18_castream" in description and methods["value"] == ["gradcam", "opticam"]
    assert target["choices"] == [PREDICTED, *CLASSES]
    top, gallery = ui.classify(castream.name, False, str(tmp_path / "image.png"), "50, 20, 90, 60")
    assert len(top) == 3 and len(gallery) == 5 and gallery[0][0].ndim == 3
    maps, table, figure = ui.explain_methods(castream.name, False, str(tmp_path / "image.png"), "", "softmax",
                                             ["gradcam"], "bag", 2, progress=lambda *args, **kwargs: None)
    assert [caption for _, caption in maps] == ["built-in saliency", "gradcam"]
    assert "class **bag**" in table and len(figure.axes) == 2
    with pytest.raises(gr.Error, match="upload an image"):
        ui.classify(castream.name, False, None, "")
    with pytest.raises(gr.Error, match="not an image"):
        (tmp_path / "notes.png").write_text("text")
        ui.classify(castream.name, False, str(tmp_path / "notes.png"), "")
    assert ui.corner("", gr.SelectData(None, {"index": [10, 12], "value": None})) == "10, 12"
    assert ui.corner("10, 12", gr.SelectData(None, {"index": [4, 30], "value": None})) == "4, 12, 10, 30"
    assert ui.corner("4, 12, 10, 30", gr.SelectData(None, {"index": [1, 2], "value": None})) == "1, 2"
    (tmp_path / "box.json").write_text(json.dumps([1, 2, 30, 40]))
    assert ui.uploaded_box(str(tmp_path / "box.json"), "") == "1, 2, 30, 40"



@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with served_app(tmp_path_factory.mktemp("app")) as served:
        yield served


def test_a_slow_explanation_waits_in_its_queue_and_holds_up_no_quick_request(app):
    """Explanations run one at a time (the others wait in the queue); the top-5 and built-in maps are answered
    meanwhile. Ordering only: the queued job has not started when the quick answer comes back."""
    gradio_client = pytest.importorskip("gradio_client", reason="the app needs the [app] extra")
    url, model = app
    client = gradio_client.Client(url, verbose=False)
    image = gradio_client.handle_file(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    slow = [client.submit(model, False, image, "", "softmax", ["scorecam", "ablationcam", "opticam"], PREDICTED, 300,
                          api_name="/explain_methods") for _ in range(2)]
    def running(job) -> bool:
        return job.status().code.name in ("PROCESSING", "PROGRESS")

    def settled() -> bool:  # one job running, the other past its submission
        return any(map(running, slow)) and all(job.status().code.name != "STARTING" for job in slow)

    deadline = time.monotonic() + 120
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.05)
    first, second = slow if running(slow[0]) else slow[::-1]  # the server took them in either order
    assert second.status().code.name == "IN_QUEUE"
    top, builtin = client.predict(model, False, image, "", "softmax", api_name="/classify")
    assert set(top["confidences"][0]) >= {"label", "confidence"} and len(builtin) == 5
    assert running(first) and second.status().code.name == "IN_QUEUE"
    steps = set()  # the running job says which method it is at
    while not first.done() and not any(" of 4)" in step for step in steps) and time.monotonic() < deadline:
        steps |= {unit.desc for unit in first.status().progress_data or [] if unit.desc}
        time.sleep(0.05)
    assert any(" of 4)" in step for step in steps), steps
    for job in slow:
        maps, table, _ = job.result(timeout=600)
        assert len(maps) == 4 and "opticam" in table
