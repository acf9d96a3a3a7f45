"""Training-step time of gradient denoising (thesis ch. 4) against the plain objective, side by side.

    python benchmarks/gradient_denoising_speed.py [--models resnet18_cifar mobilenetv2_cifar] [--batch 128]
        [--repeats 5] [--formats contiguous channels_last] [--device cpu|cuda] [--threads N] [--keep-freed-memory]
        [--out results/benchmark]

One step is what training does: zero the gradients, the objective (``Classification`` or
``GradientDenoising()``, cosine, λ = 7.5e-3), ``loss.backward()`` and an SGD step, on a fixed CIFAR-100
sized batch (32 px, 100 classes) of a randomly initialised model in train mode. For each model and memory
format the objectives alternate within every repetition (so all see the same machine load) after one warm-up
step each; the median step times are reported with the median of the per-repetition ratios GD / standard
(the thesis counts 5 passes against 2, about 2.5x). ``channels_last`` changes the speed, not the loss: the
gradient-denoising loss of the first step is printed per format to show it. ``torch.compile`` of the step
is not offered: its aot_autograd does not support double backward, which the regulariser needs (the
objective compiles its batch-norm derivative, which runs inside the last backward). The objective
records its convolutions and batch norms as ``zoo.training.double_backward`` nodes; a third objective, the same
with torch's own layers and their double backward (a per-group loop for grouped convolutions, a generic
formula for batch norm), is timed beside it. On the first batch both objectives' float32 parameter gradients
are compared with float64 ones through torch's layers (cuDNN's TF32 off): errors of the same size are float32's
rounding, which these random networks' second derivatives amplify. On a CPU, three more steps of each
objective run under ``torch.profiler`` (medians kept): the time their convolutions take (the self time of
operators whose name has "convolution") gives the ratio convolutions alone would set, and the largest other
operators of the GD step show what lies above it ("compiled graphs": those of ``torch.compile``; on a GPU,
kernels and the operators that launch them would need matching first; not done). On a GPU each step is also
captured once as a CUDA graph (``--no-cuda-graphs`` skips it), which takes Python and kernel launches out of
the step, and replays of the standard and the GD graph alternate the same way; the replayed loss and gradients
are compared with an eager step on the same weights. Writes a JSON file and a Markdown table into ``--out``,
named by the time of the run.

On Linux, glibc's ``malloc`` maps large blocks afresh and page-faults them on every step (why and what it
costs: ``zoo.training.allocator``). ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824``, or
``--keep-freed-memory`` from within the process as ``zoo-train`` does by default, make it keep freed memory for
reuse; the run's setting names either when it is in effect.
"""

import argparse
import collections
import copy
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from measure import device_name, save_run, timed
from torch.profiler import ProfilerActivity, profile

import zoo  # noqa: F401  (registers resnet18_cifar and mobilenetv2_cifar with timm)
from zoo.training.allocator import keep_freed_memory
from zoo.training.gradient_denoising import GradientDenoising
from zoo.training.objectives import Classification

MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
IMAGE_SIZE, NUM_CLASSES = 32, 100
ALLOCATOR_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")  # named if set


def training_step(model, optimiser, objective, images, labels):
    optimiser.zero_grad(set_to_none=True)
    step = objective(model, images, labels)
    step.loss.backward()
    optimiser.step()
    return step.loss.item()


def setup(name, memory_format, batch, device):
    """A randomly initialised model in train mode, its SGD optimiser and a fixed batch; the same for a name."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=NUM_CLASSES).train().to(device, memory_format=memory_format)
    images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(NUM_CLASSES, (batch,), device=device)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    return model, optimiser, images, labels


def alternated(steps, repeats, device, label):
    """Seconds of each of ``steps`` (name -> callable), run in turn ``repeats`` times, the order reversed
    every other time."""
    times = {key: [] for key in steps}
    for r in range(repeats):
        for key in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            times[key].append(timed(steps[key], device)[0])
        print(f"  {label} repetition {r + 1}/{repeats}: "
              + ", ".join(f"{key} {times[key][-1] * 1e3:.1f} ms" for key in steps), flush=True)
    return times


def median_ratio(times, key):
    return statistics.median(t / s for t, s in zip(times[key], times["standard"], strict=True))


def gradients(model, objective, images, labels):
    """(loss, all parameter gradients as one vector) of one objective on the model's current weights."""
    model.zero_grad(set_to_none=True)
    loss = objective(model, images, labels).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


@contextmanager
def without_tf32():
    """cuDNN convolutions in full float32 (on a GPU they default to TF32), so that differences are float32's."""
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = allowed


def relative_difference(a, b):
    return ((a - b).norm() / b.norm()).item()


def gradient_errors(model, objectives, images, labels):
    """Relative errors of the float32 parameter gradients of the GD step, through our layers and through torch's,
    from the float64 ones through torch's layers, on the model's current weights (cuDNN's TF32 off)."""
    exact = gradients(copy.deepcopy(model).double(), objectives["torch_layers"], images.double(), labels)[1]
    with without_tf32():
        return {key: relative_difference(gradients(model, objectives[key], images, labels)[1].double(), exact)
                for key in ("denoising", "torch_layers")}


def compare(name, memory_format, batch, repeats, device):
    model, optimiser, images, labels = setup(name, memory_format, batch, device)
    objectives = {"denoising": GradientDenoising(),
                  "torch_layers": GradientDenoising(lean_double_backward=False),
                  "standard": Classification()}
    errors = gradient_errors(model, objectives, images, labels)
    first_loss = {key: training_step(model, optimiser, objective, images, labels)  # warm-up
                  for key, objective in objectives.items()}
    times = alternated({key: lambda objective=objective: training_step(model, optimiser, objective, images, labels)
                        for key, objective in objectives.items()},
                       repeats, device, f"{name} {memory_format_name(memory_format)}")
    ratios = {key: [t / s for t, s in zip(times[key], times["standard"], strict=True)]
              for key in ("denoising", "torch_layers")}
    return dict(**(convolution_profile(model, optimiser, objectives, images, labels) if device.type == "cpu" else {}),
                model=name, memory_format=memory_format_name(memory_format), batch=batch, repeats=repeats,
                standard_s=statistics.median(times["standard"]), denoising_s=statistics.median(times["denoising"]),
                ratio=statistics.median(ratios["denoising"]), ratio_min=min(ratios["denoising"]),
                ratio_max=max(ratios["denoising"]), ratio_torch_layers=median_ratio(times, "torch_layers"),
                gradient_error_float64=errors,
                first_denoising_loss=first_loss["denoising"], times=times)


class CapturedStep:
    """A training step of a fresh ``setup`` captured once as a CUDA graph, after three eager steps on a side
    stream (as capture requires); calling it replays the graph. It holds the model, optimiser and batch: the
    graph reads and writes their memory but does not keep it. ``difference``: relative differences of the first
    replay's loss and parameter gradients from an eager step on a copy of the same weights."""

    def __init__(self, objective, name, memory_format, batch, device):
        self.model, self.optimiser, self.images, self.labels = setup(name, memory_format, batch, device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                training_step(self.model, self.optimiser, objective, self.images, self.labels)
        torch.cuda.current_stream().wait_stream(side)
        expected_loss, expected_gradients = gradients(copy.deepcopy(self.model), objective, self.images, self.labels)
        self.graph = torch.cuda.CUDAGraph()
        self.optimiser.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.loss = objective(self.model, self.images, self.labels).loss
            self.loss.backward()
            self.optimiser.step()
        self()  # SGD's weight decay adds to a copy: .grad keeps the gradient
        replayed_gradients = torch.cat([p.grad.flatten() for p in self.model.parameters()])
        self.difference = dict(loss=relative_difference(self.loss, expected_loss),
                               gradients=relative_difference(replayed_gradients, expected_gradients))

    def __call__(self):
        self.graph.replay()


def compare_graphed(row, repeats, device):
    """Standard and GD steps as CUDA graph replays, alternated; added to the eager comparison's row."""
    steps = {key: CapturedStep(objective, row["model"], MEMORY_FORMATS[row["memory_format"]], row["batch"], device)
             for key, objective in {"standard": Classification(), "denoising": GradientDenoising()}.items()}
    times = alternated(steps, repeats, device, f"{row['model']} {row['memory_format']} CUDA graphs")
    row.update(graphed_standard_s=statistics.median(times["standard"]),
               graphed_denoising_s=statistics.median(times["denoising"]),
               graphed_ratio=median_ratio(times, "denoising"),
               graphed_replay_difference={key: step.difference for key, step in steps.items()}, graphed_times=times)


def convolution_profile(model, optimiser, objectives, images, labels, rounds=3):
    """CPU-profiled steps of each objective, alternated over ``rounds``: GD / standard time in convolutions, their
    share of each step, and the four operators other than convolutions that take the GD step longest (seconds);
    medians over the rounds, as a single step may be hit by the machine's other load."""
    seconds = {key: [] for key in objectives}
    for r in range(rounds):
        for key in list(objectives) if r % 2 == 0 else list(objectives)[::-1]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                training_step(model, optimiser, objectives[key], images, labels)
            operators = collections.Counter()
            for event in prof.key_averages():  # torch.compile's graphs are named by a hash: counted as one
                operators["compiled graphs" if "CompiledFxGraph" in event.key else event.key] += \
                    event.self_cpu_time_total / 1e6
            seconds[key].append(operators)
    conv = {key: statistics.median(sum(t for op, t in ops.items() if "convolution" in op) for ops in runs)
            for key, runs in seconds.items()}
    total = {key: statistics.median(sum(ops.values()) for ops in runs) for key, runs in seconds.items()}
    others = {op: statistics.median(ops.get(op, 0.0) for ops in seconds["denoising"])
              for op in seconds["denoising"][0] if "convolution" not in op}
    return dict(conv_ratio=conv["denoising"] / conv["standard"],
                conv_ratio_torch_layers=conv["torch_layers"] / conv["standard"],
                conv_share={key: conv[key] / total[key] for key in objectives},
                largest_other_ops=dict(sorted(others.items(), key=lambda item: -item[1])[:4]))


def memory_format_name(memory_format):
    return next(key for key, value in MEMORY_FORMATS.items() if value == memory_format)


def markdown(setting, rows):
    lines = [f"Measured {setting}.", "",
             "| model | memory format | standard step ms | GD step ms | GD / standard (min-max) "
             "| with torch's own layers | GD img/s | GD loss, first step "
             "| gradient error vs float64: ours / torch's layers "
             "| CUDA graphs: standard ms / GD ms | CUDA graphs: GD / standard "
             "| convolutions alone: GD / standard (with torch's layers) | convolutions' share, standard / GD "
             "| largest other operators of the GD step (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        errors, profiled = r["gradient_error_float64"], "- | - | -"
        if "conv_ratio" in r:
            shares, others = r["conv_share"], ", ".join(f"{op} {t:.2f}" for op, t in r["largest_other_ops"].items())
            profiled = (f"{r['conv_ratio']:.2f}x ({r['conv_ratio_torch_layers']:.2f}x) | "
                        f"{shares['standard']:.0%} / {shares['denoising']:.0%} | {others}")
        graphed = r.get("graphed_error", "-") + " | -"
        if "graphed_ratio" in r:
            graphed = (f"{r['graphed_standard_s'] * 1e3:.2f} / {r['graphed_denoising_s'] * 1e3:.2f} | "
                       f"{r['graphed_ratio']:.2f}x")
        lines.append(f"| {r['model']} | {r['memory_format']} | {r['standard_s'] * 1e3:.1f} | "
                     f"{r['denoising_s'] * 1e3:.1f} | {r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
                     f"{r['ratio_torch_layers']:.2f}x | {r['batch'] / r['denoising_s']:.1f} | "
                     f"{r['first_denoising_loss']:.6f} | {errors['denoising']:.1e} / {errors['torch_layers']:.1e} | "
                     f"{graphed} | {profiled} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18_cifar", "mobilenetv2_cifar"])
    parser.add_argument("--batch", type=int, default=128, help="images per step (the thesis: 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each objective")
    parser.add_argument("--formats", nargs="+", choices=list(MEMORY_FORMATS), default=list(MEMORY_FORMATS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="on a GPU, skip the CUDA graph replays")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc's malloc keeps freed memory for reuse, as zoo-train does (training.allocator)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = device_name(device)
    setting = (f"on {where}, torch {torch.__version__}, batch {args.batch} at {IMAGE_SIZE} px, median of "
               f"{args.repeats} alternating steps, {time.strftime('%Y-%m-%d')}")
    allocator = [f"{key}={os.environ[key]}" for key in ALLOCATOR_SETTINGS if key in os.environ]
    if args.keep_freed_memory and keep_freed_memory():
        allocator.append("glibc's malloc keeping freed memory (training.allocator)")
    setting += f", with {' '.join(allocator)}" if allocator else ""
    print(f"Training step, standard vs gradient denoising ({setting})", flush=True)

    rows = []
    for name in args.models:
        for key in args.formats:
            rows.append(compare(name, MEMORY_FORMATS[key], args.batch, args.repeats, device))
    if device.type == "cuda" and not args.no_cuda_graphs:
        print(markdown(setting, rows), flush=True)  # the eager rows, in case a capture brings the process down
        for row in rows:
            try:
                compare_graphed(row, args.repeats, device)
            except RuntimeError as error:  # a step that cannot be captured: reported in its row
                row["graphed_error"] = f"capture failed: {error}".splitlines()[0].replace("|", "/")
                print(f"  {row['model']} {row['memory_format']}: {row['graphed_error']}", flush=True)
    table = markdown(setting, rows)
    print(table)
    save_run(args.out, "gradient_denoising_speed", dict(setting=setting, rows=rows), table)


if __name__ == "__main__":
    main()
