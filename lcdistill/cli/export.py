"""`lcdistill export`: ONNX / TorchScript files checked against PyTorch, optionally an int8 ONNX file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from lcdistill.cli.common import fail, user_errors
from lcdistill.defaults import CALIBRATION_IMAGES, OPSET
from lcdistill.errors import UserError

FORMATS = ("onnx", "torchscript", "pt2", "hub", "all")


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
    from lcdistill import artifacts, exporters as exporter
    from lcdistill.runfolder import RunFolder
    from lcdistill.data import eval_loader

    if format not in FORMATS:
        raise UserError(f"unknown --format '{format}'", "choose onnx, torchscript, pt2, hub or all")
    if quantize not in ("none", "int8"):
        raise UserError(f"unknown --quantize '{quantize}'", "choose none or int8")
    if quantize == "int8" and format not in ("onnx", "all"):
        raise UserError("--quantize int8 quantizes the ONNX file", "use --format onnx or --format all")
    if weight_bits is not None and (quantize != "int8" or weight_bits not in (8, 4)):
        raise UserError(f"--weight-bits {weight_bits} needs --quantize int8 and a width of 8 or 4", "pass --quantize int8 --weight-bits 8 (or 4)")
    source_file = artifacts.identify(target, accept=("run", "weights"))
    loaded, task = source_file.loaded, source_file.task
    meta = loaded.meta
    trained_bits = meta["qat"].get("weight_bits", 8) if meta.get("qat") else None
    if trained_bits is not None and weight_bits not in (None, trained_bits):
        raise UserError(f"{target} was trained quantization-aware for {trained_bits}-bit weights, not --weight-bits {weight_bits}",
                        f"drop --weight-bits (or pass {trained_bits}); post-training int8 of another width starts from a float run")
    weight_bits = trained_bits or weight_bits or 8
    model = task.exportable(loaded.model)
    out_dir = Path(out) if out else source_file.folder
    data_dir = data or _run_data(source_file.folder)
    if quantize == "int8" and not data_dir:
        raise UserError("--quantize int8 needs training images to calibrate with", "pass --data DIR (the run's own data is not found)")
    if data_dir:
        splits = task.scan(data_dir, check=False)
        item = task.batch(next(iter(eval_loader(task.eval_dataset(splits.val, meta), 8, 0))))
        batch, source = task.inputs(item, meta["mean"], meta["std"]), f"{len(item)} val images from {data_dir}"
    else:
        batch, source = task.export.example(meta, 8), "8 random inputs (pass --data for real images)"
    files = {}
    if format in ("onnx", "all"):
        files["onnx"] = exporter.to_onnx(model, meta, RunFolder(out_dir).export("onnx"), task.export, opset)
    if format in ("torchscript", "all"):
        files["torchscript"] = exporter.to_torchscript(model, meta, RunFolder(out_dir).export("torchscript"))
    if format in ("pt2", "all"):
        try:
            files["pt2"] = exporter.to_pt2(model, meta, RunFolder(out_dir).export("pt2"), task.export)
        except UserError as e:
            if format == "pt2":
                raise
            typer.echo(f"pt2: skipped: {e.line()}")
    if format in ("hub", "all"):
        from lcdistill import hubfolder

        files["hub"] = hubfolder.from_artifact(source_file, RunFolder(out_dir).hub, eval_file)
    diffs = exporter.parity(model, files, batch, task.export)
    worst = 0.0
    for fmt, diff in diffs.items():
        worst = max(worst, diff)
        typer.echo(f"{fmt}: {files[fmt]}  max |diff| vs PyTorch {diff:.2e} ({task.export.diff_text}) on {source} and batch 1")
    if worst > tolerance:
        fail(f"export differs from PyTorch by {worst:.2e} > tolerance {tolerance:g}", 1)
    from lcdistill import export_sizes  # a dynamic height and width: parity at a second size and batch too

    shape, second = export_sizes.check(model, files, task.export, meta)
    for fmt, diff in second.items():
        typer.echo(f"{fmt}: max |diff| vs PyTorch {diff:.2e} ({task.export.diff_text}) at batch {shape[0]}, {shape[2]}x{shape[3]} (dynamic height and width)")
    if second and max(second.values()) > tolerance:
        fail(f"export differs from PyTorch by {max(second.values()):.2e} > tolerance {tolerance:g} at input {shape[2]}x{shape[3]}", 1)
    if quantize == "int8" and meta.get("qat"):
        _export_qat_int8(loaded, task, meta, files["onnx"], data_dir, calibration_images, opset, batch)
    elif quantize == "int8":
        _export_int8(model, task, meta, files["onnx"], data_dir, calibration_images, batch, source, weight_bits)


def _agreement(task, run, reference, batches) -> tuple[int, int]:
    import torch

    agree = total = 0
    with torch.no_grad():
        for batch in batches:
            for x in task.export.calls(batch):
                a, t = task.export.agreement(run(x), reference(x))
                agree, total = agree + a, total + t
    return agree, total


def _export_int8(model, task, meta: dict, fp32: Path, data_dir: str, images: int, batch, source: str, weight_bits: int) -> None:
    """student.int8.onnx (student.w4a8.onnx) beside the fp32 file; int8 is judged by agreement, not by a tolerance."""
    from lcdistill import exporters as exporter
    from lcdistill.quantize import ptq as quant

    batches = quant.calibration_batches(task, data_dir, meta, images)
    int8 = quant.quantize(fp32, quant.int8_path(fp32, weight_bits), batches, str(Path(data_dir).resolve()), weight_bits=weight_bits)
    agree, total = _agreement(task, exporter.runner("onnx", int8), model.eval(), [batch])
    where = "" if task.export.unit == "images" else f" {task.export.unit}"
    mb = lambda p: p.stat().st_size / 1e6  # noqa: E731
    typer.echo(f"int8: {int8}  {mb(int8):.2f} MB (fp32 {mb(fp32):.2f} MB), calibrated on {sum(len(b) for b in batches)} train images;"
               f" {task.export.agreement_text} {agree}/{total}{where} of {source}; measure accuracy with `lcdistill eval`")


def _export_qat_int8(loaded, task, meta: dict, fp32: Path, data_dir: str, images: int, opset: int, batch) -> None:
    """The int8 ONNX of a quantization-aware run, from what it learnt: its weights lie on their int8 grid
    already, and its activation scales go to onnxruntime as overrides (lcdistill.quantize.onnx_scales); judged by
    agreement with the fake-quantized PyTorch model on the whole val split, and by the kernels onnxruntime runs."""
    import copy
    import dataclasses
    import tempfile

    import onnx
    import torch

    from lcdistill import exporters as exporter
    from lcdistill.quantize import onnx_scales, ptq as quant
    from lcdistill.quantize.prepare import attach

    qat = meta["qat"]
    # exported with its activation quantizers only (onnxruntime rounds the int32 biases itself); judged against the
    # model that rounds them as onnxruntime does
    reference = task.exportable(attach(copy.deepcopy(loaded.model), qat["activations"])).eval()
    attached = attach(copy.deepcopy(loaded.model), qat["activations"], qat.get("bias")).eval()
    batches = quant.calibration_batches(task, data_dir, meta, images)
    with tempfile.TemporaryDirectory(prefix="lcdistill-qat-") as tmp:
        # torch.export cannot take fake quantization with a dynamic batch (its cachemask variant has no symbolic
        # shapes), so this file comes from torch.onnx's TorchScript-based exporter, which writes each quantizer
        # as a QuantizeLinear/DequantizeLinear pair; the int8 file is made from this graph itself, so every
        # harvested tensor name is one its quantizer sees
        with torch.no_grad():
            marked = exporter.to_onnx(reference, meta, Path(tmp) / "marked.onnx", dataclasses.replace(task.export, legacy_onnx=True), opset)
        proto = onnx.load(str(marked))
        scales = onnx_scales.harvest(proto)
        plain = Path(tmp) / "plain.onnx"
        onnx.save_model(proto, str(plain))
        bits = qat.get("weight_bits", 8)
        int8 = quant.quantize(plain, quant.int8_path(fp32, bits), batches, str(Path(data_dir).resolve()), overrides=onnx_scales.overrides(scales),
                              how={"method": "quantization-aware", "activation_scales": f"{len(scales)} learnt in training, the rest calibrated"},
                              weight_bits=bits, trained_weights=True)
    graph = onnx.load(str(int8), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in weights}
    learnt = len(quantized & set(scales))
    val = task.scan(data_dir, check=False).val
    agree, total, got, want = _side_by_side(task, meta, int8, attached, val)
    ops = onnx_scales.executed_ops(int8, task.export.calls(batch[:1])[0].numpy())
    integer = {k: v for k, v in ops.items() if k.startswith("QLinear") or "Integer" in k}
    floating = {k: v for k, v in ops.items() if k in ("Conv", "Gemm", "MatMul")}
    where = "" if task.export.unit == "images" else f" {task.export.unit}"
    mb = lambda p: p.stat().st_size / 1e6  # noqa: E731
    typer.echo(f"int8: {int8}  {mb(int8):.2f} MB (fp32 {mb(fp32):.2f} MB), quantization-aware: weights as trained, {learnt} of the "
               f"{len(quantized)} activation scales learnt in training, the rest calibrated on {sum(len(b) for b in batches)} train images;"
               f" {task.export.agreement_text} {agree}/{total}{where} of the {len(val.samples)} val images against the fake-quantized PyTorch model")
    metric = task.metric(len(meta["classes"]))
    typer.echo(f"int8: {metric.best_header} on val {got[metric.best]:.2f}, the fake-quantized PyTorch model {want[metric.best]:.2f} "
               f"(difference {got[metric.best] - want[metric.best]:+.2f})")
    dequantized = ops.get("DequantizeLinear", 0)
    typer.echo("int8: onnxruntime ran " + (", ".join(f"{k} x{v}" for k, v in sorted(integer.items())) or "no integer kernel")
               + (" and in float " + ", ".join(f"{k} x{v}" for k, v in sorted(floating.items())) if floating else "")
               + (f" (int{bits} weights: {dequantized} DequantizeLinear feed float convolutions)" if bits != 8 else ""))


def _side_by_side(task, meta: dict, int8: Path, reference, val) -> tuple[int, int, dict, dict]:
    """(agreeing, total, the int8 file's metric, the reference PyTorch model's) over the val split, streamed."""
    import torch

    from lcdistill import artifacts
    from lcdistill.data import eval_loader

    got_run, want_run = artifacts.Artifact(int8, "onnx").predict, task.predictor(reference)
    got, want = task.metric(len(meta["classes"])), task.metric(len(meta["classes"]))
    agree = total = 0
    with torch.no_grad():
        for item in eval_loader(task.eval_dataset(val, meta), 64, 0):
            batch = task.batch(item)
            x = task.inputs(batch, meta["mean"], meta["std"])
            a, b = got_run(x), want_run(x)
            got.update(a, batch.targets), want.update(b, batch.targets)
            k, n = task.export.agreement(a, b)
            agree, total = agree + k, total + n
    return agree, total, got.compute(), want.compute()


def _run_data(folder: Path) -> str | None:
    from lcdistill.runfolder import RunFolder

    run_file = RunFolder(folder).inputs
    if run_file.is_file():
        data_dir = json.loads(run_file.read_text()).get("data")
        if data_dir and Path(data_dir).is_dir():
            return data_dir
    return None


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
