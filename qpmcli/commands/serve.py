"""``qpm serve [MODEL]``: the model explorer and inference server in the browser (FastAPI + uvicorn, ONNX Runtime)."""

from __future__ import annotations

import typer


def serve(
    model: str = typer.Argument(None, help="Exported .onnx file or run directory (its model.onnx); default: the "
                                           "current run."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0 picks a free one)."),
    device: str = typer.Option(None, "--device", help="ONNX Runtime device: auto, cpu, cuda[:N], tensorrt "
                                                      "(default: the device setting)."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest accepted upload (413 beyond)."),
    max_batch: int = typer.Option(16, "--max-batch", help="Micro-batching: most images per ONNX Runtime call."),
    batch_window_ms: float = typer.Option(4.0, "--batch-window-ms",
                                          help="Micro-batching: longest wait for concurrent requests."),
) -> None:
    """Serve a model: explorer pages (classes, features, prototypes), an explain page, and a JSON API (/docs)."""
    from qpmcli.options import check_device
    from qpmcli.serve import serve as run_serve
    from qpmcli.settings import resolve_settings

    device = check_device(device or resolve_settings()[0].device, tensorrt=True)  # one grammar: settings' default

    run_serve(model, host=host, port=port, device=device, max_upload_mb=max_upload_mb, max_batch=max_batch,
              batch_window_ms=batch_window_ms)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
