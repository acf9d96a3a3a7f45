"""timm's train.py, validate.py, inference.py and benchmark.py on zoo models (issues 24, 23). The scripts are not
installed with timm, so the library path they take runs here at toy sizes, on models created as their
``--model-kwargs return_saliency=False`` creates them; and a ``ModelOutput`` that reaches code expecting a tensor
says what to do."""

import argparse
import copy
import pickle
import re

import pytest
import timm
import timm.optim
import torch
from PIL import Image
from timm.data import Mixup, create_dataset, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import load_checkpoint
from timm.utils import ModelEmaV3, ParseKwargs, accuracy, get_state_dict
from torch import nn

import zoo

# the smallest inputs their last stages' strides allow
SIZES = {"resnet18_castream": 32, "regnety_016_castream": 32, "resnet18_cifar": 16}
CLASSES = 3
BATCH = 2
HINT = re.escape("read its .logits, or create the model with return_saliency=False") + ".*" + re.escape(
    "--model-kwargs return_saliency=False")


def script_model_kwargs(argv: list[str]) -> dict:
    """``--model-kwargs`` parsed as timm's scripts parse it (``timm.utils.ParseKwargs``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs)
    return parser.parse_args(argv).model_kwargs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Toy-sized steps run on one thread: spread over cores that other work shares, they can be many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An ImageFolder layout: ``train`` and ``validation``, each with two random images of every class."""
    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "validation"):
        for label in range(CLASSES):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for index in range(2):
                pixels = torch.randint(0, 256, (40, 48, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def saliency_output():
    """A zoo model's default output, the ``ModelOutput`` that timm's scripts used to choke on."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18_castream", pretrained=False, num_classes=CLASSES).eval()
    with torch.no_grad():
        return model(torch.randn(2, 3, 32, 32))


TENSOR_USES = {
    "criterion(model(x), y)": (TypeError, lambda out, y: nn.CrossEntropyLoss()(out, y)),
    "timm's LabelSmoothingCrossEntropy": (TypeError, lambda out, y: LabelSmoothingCrossEntropy(0.1)(out, y)),
    "timm's SoftTargetCrossEntropy": (TypeError, lambda out, y: SoftTargetCrossEntropy()(out, torch.ones(2, CLASSES))),
    "timm.utils.accuracy": (AttributeError, lambda out, y: accuracy(out, y, topk=(1, 2))),
    "torch.softmax(out)": (TypeError, lambda out, y: torch.softmax(out, -1)),
    "torch.argmax(out)": (TypeError, lambda out, y: torch.argmax(out, 1)),
    "out.argmax(1)": (AttributeError, lambda out, y: out.argmax(1)),
    "out.log_softmax": (AttributeError, lambda out, y: out.log_softmax),
    "out.shape": (AttributeError, lambda out, y: out.shape),
    "out + 1": (TypeError, lambda out, y: out + 1),
    "out / temperature": (TypeError, lambda out, y: out / 2.0),
    "logits - out": (TypeError, lambda out, y: out.logits - out),
    "out > 0": (TypeError, lambda out, y: out > 0),
}


@pytest.mark.parametrize("use", TENSOR_USES)
def test_a_model_output_used_as_a_tensor_says_to_read_logits_or_pass_return_saliency_false(use, saliency_output):
    error, run = TENSOR_USES[use]
    with pytest.raises(error, match=HINT):
        run(saliency_output, torch.tensor([0, 1]))


def test_a_model_output_still_behaves_as_its_named_tuple(saliency_output):
    logits, saliency = saliency_output
    assert isinstance(saliency_output, tuple) and not isinstance(saliency_output, torch.Tensor)
    assert saliency_output._fields == ("logits", "saliency") and saliency_output[0] is logits
    assert saliency_output._replace(saliency=None) == (logits, None)
    assert saliency_output + ("extra",) == (logits, saliency, "extra") and len(2 * saliency_output) == 4
    assert zoo.ModelOutput(0, 1) < zoo.ModelOutput(0, 2)
    for copied in (pickle.loads(pickle.dumps(saliency_output)), copy.deepcopy(saliency_output)):
        assert type(copied) is zoo.ModelOutput
        torch.testing.assert_close(copied.logits, logits)
    assert not hasattr(saliency_output, "weights")
    with pytest.raises(AttributeError) as plain:
        _ = saliency_output.weights
    assert "return_saliency" not in str(plain.value)  # the hint is for tensor attributes only


@pytest.mark.parametrize("name", SIZES)
def test_timm_scripts_run_on_zoo_models_at_toy_sizes(name, image_folder, tmp_path):
    assert name in timm.list_models("*castream*") + timm.list_models("*cifar*")
    model_kwargs = script_model_kwargs(["--model-kwargs", "return_saliency=False"])
    assert model_kwargs == {"return_saliency": False}

    def create_model(**options):
        return timm.create_model(name, pretrained=False, in_chans=3, num_classes=CLASSES, **options, **model_kwargs)

    model = create_model(drop_rate=0.0)
    size = SIZES[name]
    data_config = resolve_data_config({"input_size": (3, size, size)}, model=model)
    loader_options = dict(input_size=data_config["input_size"], batch_size=BATCH, mean=data_config["mean"],
                          std=data_config["std"], interpolation=data_config["interpolation"], num_workers=0)

    # train.py: Mixup with SoftTargetCrossEntropy, else LabelSmoothingCrossEntropy; create_optimizer_v2; ModelEmaV3
    train_set = create_dataset("", root=str(image_folder), split="train", is_training=True)
    train_loader = create_loader(train_set, is_training=True, use_prefetcher=False, **loader_options)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=CLASSES)
    optimizer = timm.optim.create_optimizer_v2(model, opt="sgd", lr=0.1, momentum=0.9)
    ema = ModelEmaV3(model, decay=0.9)
    before = copy.deepcopy(model.state_dict())
    model.train()
    for step, (images, targets) in enumerate(train_loader):
        assert images.shape == (BATCH, 3, size, size)
        if step == 0:
            images, soft_targets = mixup(images, targets)
            loss = SoftTargetCrossEntropy()(model(images), soft_targets)
        else:
            loss = LabelSmoothingCrossEntropy(0.1)(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model, step=step)
        assert loss.isfinite()
    assert step + 1 == 2 * CLASSES // BATCH
    assert any(not torch.equal(before[key], value) for key, value in model.state_dict().items())
    checkpoint = tmp_path / "checkpoint.pth.tar"  # what train.py's CheckpointSaver keeps
    torch.save({"state_dict": get_state_dict(model), "state_dict_ema": get_state_dict(ema)}, checkpoint)

    # validate.py and train.py's validate: the checkpoint's weights or its EMA's, CrossEntropyLoss, top-k accuracy
    eval_set = create_dataset("", root=str(image_folder), split="validation")
    eval_loader = create_loader(eval_set, crop_pct=data_config["crop_pct"], crop_mode=data_config["crop_mode"],
                                use_prefetcher=False, **loader_options)
    for trained, use_ema in ((model, False), (ema.module, True)):
        evaluated = create_model()
        load_checkpoint(evaluated, str(checkpoint), use_ema=use_ema)
        evaluated.eval()
        trained.eval()
        with torch.no_grad():
            for images, targets in eval_loader:
                output = evaluated(images)
                torch.testing.assert_close(output, trained(images))
                assert nn.CrossEntropyLoss()(output, targets).isfinite()
                top1, top2 = accuracy(output, targets, topk=(1, 2))
                assert 0 <= top1 <= top2 <= 100

    # inference.py: the checkpoint, a prefetching loader, softmax and the top-k classes
    evaluated = create_model(checkpoint_path=str(checkpoint)).eval()
    loader = create_loader(eval_set, batch_size=BATCH, num_workers=0, device=torch.device("cpu"), **data_config)
    with torch.no_grad():
        probabilities = torch.cat([evaluated(images).softmax(-1) for images, _ in loader])
    top_probabilities, top_classes = probabilities.topk(2)
    assert top_classes.shape == (len(eval_set), 2) and ((0 <= top_classes) & (top_classes < CLASSES)).all()
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(len(eval_set)))
    assert (top_probabilities[:, 0] >= top_probabilities[:, 1]).all()

    # benchmark.py: created with its defaults (no --gp, --drop-path, --drop-block: None, which create_model drops) and
    # no --model-kwargs (not every version has them), channels-last, the test input size, an inference step and a
    # train step with create_optimizer_v2 on the first element of a tuple output, as the script does
    benchmarked = timm.create_model(name, num_classes=None, in_chans=3, global_pool=None, scriptable=False,
                                    drop_rate=0.0, drop_path_rate=None, drop_block_rate=None)
    benchmarked.to(device="cpu", dtype=torch.float32, memory_format=torch.channels_last)
    bench_config = resolve_data_config({"input_size": (3, size, size)}, model=benchmarked, use_test_size=True)
    inputs = torch.randn(BATCH, *bench_config["input_size"]).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert isinstance(benchmarked.eval()(inputs), zoo.ModelOutput)
    benchmarked.train()
    bench_optimizer = timm.optim.create_optimizer_v2(benchmarked, opt="sgd", lr=1e-4)
    bench_optimizer.zero_grad()
    output = benchmarked(inputs)
    if isinstance(output, tuple):
        output = output[0]
    targets = torch.empty(BATCH, dtype=torch.long).random_(benchmarked.num_classes)
    loss = nn.CrossEntropyLoss()(output, targets)
    loss.backward()
    bench_optimizer.step()
    assert loss.isfinite() and benchmarked.num_classes == benchmarked.pretrained_cfg["num_classes"]  # None: default
