"""A small CA-Stream checkpoint as zoo-train exports one, and zoo-app serving it on localhost: for the explorer's
tests (tests/test_app.py, tests/test_app_browser.py)."""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import timm
from timm.models import save_for_hf

import zoo  # noqa: F401  (registers the zoo's models)

CLASSES = ["shirt", "shoe", "bag"]
ARGS = dict(channels=[8, 16, 32, 64], stem_width=8)  # a tiny CA-Stream
DATA = dict(input_size=(3, 64, 64), interpolation="bilinear", crop_pct=1.0, mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25))


def tiny_checkpoint(folder, architecture="resnet18_castream", **args):
    """A 3-class checkpoint folder at 64 px, as zoo-train exports one (label names, model args, data config)."""
    model = timm.create_model(architecture, num_classes=len(CLASSES), **args).eval()
    save_for_hf(model, folder, safe_serialization=True, model_config=dict(num_classes=3, label_names=CLASSES),
                model_args=args, data_config=DATA)
    return model


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def served_app(folder: Path) -> Iterator[tuple[str, str]]:
    """``zoo-app`` serving a small CA-Stream checkpoint (written into ``folder``) on a free port: its URL and the
    model's name."""
    tiny_checkpoint(folder / "model", **ARGS)
    port = free_port()
    log_path = folder / "app.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "zoo.app.ui", "--model", f"local-dir:{folder / 'model'}", "--demo",
             str(folder / "no-demo"), "--examples", str(folder / "examples"), "--port", str(port)],
            cwd=folder, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None:
                    pytest.fail(f"zoo-app exited with {server.returncode}:\n{log_path.read_text()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"zoo-app did not listen within 120 s:\n{log_path.read_text()}")
                    time.sleep(0.5)
            yield f"http://127.0.0.1:{port}", f"local-dir:{folder / 'model'}"
        finally:
            server.terminate()
            server.wait(30)
