"""`lcdistill export` (lcdistill.export of the flags; it prints its own lines) and `lcdistill push`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lcdistill import api
from lcdistill.cli.common import console_for, user_errors
from lcdistill.defaults import CALIBRATION_IMAGES, OPSET

@user_errors
def export(
    target: str = typer.Argument(..., help="Run folder or student .safetensors."),
    format: str = typer.Option("all", "--format", "-f", help="onnx | torchscript | pt2 (torch.export) | hub (timm Hub folder) | all"),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for the files (default: the run folder)."),
    data: Optional[str] = typer.Option(None, "--data", help="Data folder for the parity batch (default: the run's own data)."),
    opset: int = typer.Option(OPSET, "--opset", help="ONNX opset."),
    tolerance: float = typer.Option(1e-3, "--tolerance", help="Largest allowed |exported - PyTorch| on the logits, as a fraction of the largest |logit| (absolute below 1)."),
    quantize: str = typer.Option("none", "--quantize", help="none | int8: also write student.int8.onnx (static, calibrated on train images)."),
    calibration_images: int = typer.Option(CALIBRATION_IMAGES, "--calibration-images", help="Training images to calibrate int8 with."),
    weight_bits: Optional[int] = typer.Option(None, "--weight-bits", help="With --quantize int8: 8 (int8 weights) or 4 (int4 weights, uint8 activations: student.w4a8.onnx). Default: 8, or what a quantization-aware run trained."),
    eval_file: Optional[str] = typer.Option(None, "--eval", help="`lcdistill eval --save` file for the hub card's table (default: RUN/eval.json)."),
):
    """Write student.onnx / student.pt / student.pt2 (dynamic batch, metadata) and a Hub folder (hub/), and check them against PyTorch on real images."""
    api.export(target, format, out=out, data=data, opset=opset, tolerance=tolerance, quantize=quantize, calibration_images=calibration_images,
               weight_bits=weight_bits, eval_file=eval_file, console=console_for())


@user_errors
def push(
    target: str = typer.Argument(..., help="Run folder (its hub/ folder, written first when missing) or a folder from `lcdistill export --format hub`."),
    repo: str = typer.Option(..., "--repo", help="Hub repo id, ORG/NAME (created when missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
):
    """Upload the student's Hub folder (config.json, model.safetensors, README.md) to the Hugging Face Hub in one commit."""
    from lcdistill import artifacts, hubfolder
    from lcdistill.runfolder import RunFolder

    path = Path(target)
    source = None if hubfolder.is_hub_folder(path) else artifacts.identify(target, accept=("run", "weights"))
    token = hubfolder.preflight(repo)  # repo id, token, reachability: before anything is written or sent
    folder = path if source is None else RunFolder(source.folder).hub
    if source is not None and not hubfolder.is_hub_folder(folder):
        hubfolder.from_artifact(source, folder)
        typer.echo(f"hub: wrote {folder}")
    url = hubfolder.upload(folder, repo, private, token)
    typer.echo(f"pushed {folder} to https://huggingface.co/{repo} ({url})")
