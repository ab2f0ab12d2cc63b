"""``qpm serve [MODEL]``: the model explorer and inference server in the browser (FastAPI + uvicorn, ONNX Runtime)."""

from __future__ import annotations

import typer

from qpmcli import checks
from qpmcli import options as opts

MAX_UPLOAD_MB = 4096.0  # an upload beyond this is not an image to classify
MAX_WINDOW_MS = 10_000.0  # micro-batching waits at most this long for company


def serve(
    model: str = typer.Argument(None, help="Exported .onnx file or run directory (its exported model.onnx); "
                                           "default: QPM_MODEL, else the current run."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0 picks a free one)."),
    device: str = opts.device_opt(tensorrt=True),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest accepted upload (413 beyond)."),
    max_batch: int = typer.Option(16, "--max-batch", help="Micro-batching: most images per ONNX Runtime call."),
    batch_window_ms: float = typer.Option(4.0, "--batch-window-ms",
                                          help="Micro-batching: longest wait for concurrent requests."),
    test_images: str = typer.Option(None, "--test-images",
                                    help="Folder of <class>/<image> for the confusion matrix and the mistakes "
                                         "(default: the run's test split, when MODEL belongs to a run)."),
) -> None:
    """Serve a model: explorer pages (classes, features, prototypes), an explain page, and a JSON API (/docs)."""
    from qpmcli.commands._common import settings_from_flags
    from qpmcli.serve import serve as run_serve

    settings = settings_from_flags(device_check=None)
    from qpmcli.device import check_device

    device = check_device(device or settings.device, tensorrt=True)
    checks.check_positive(max_batch, "--max-batch")
    import math

    from qpmcli.errors import ConfigError

    if not (math.isfinite(max_upload_mb) and 0 < max_upload_mb <= MAX_UPLOAD_MB):
        raise ConfigError(f"--max-upload-mb must be a positive number up to {MAX_UPLOAD_MB:g}, not {max_upload_mb}")
    if not (math.isfinite(batch_window_ms) and 0 <= batch_window_ms <= MAX_WINDOW_MS):
        raise ConfigError(f"--batch-window-ms must be between 0 and {MAX_WINDOW_MS:g}, not {batch_window_ms}")
    run_serve(model, host=host, port=port, device=device, max_upload_mb=max_upload_mb, max_batch=max_batch,
              batch_window_ms=batch_window_ms, settings=settings, test_images=test_images)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
