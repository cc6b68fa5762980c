"""Quantization-aware training (--quantize int8 on train / compress) and its int8 export: the arithmetic
against onnxruntime's own, the BatchNorm folding, the schedule, what a run ships, and the int8 file that
onnxruntime runs with int8 kernels and that agrees with the fake-quantized model."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import timm
import torch
from torch import nn

from conftest import assert_user_error, cli, cli_ok
from lcdistill.quantize.fakequant import FoldedWeight, act_qparams, clip_search, clipped_quant_weight, fake_quant_weight, weight_scales
from lcdistill.quantize.prepare import ATTR, attach, bake, plan, prepare

SETTINGS = {"weight_bits": 8, "calibration_steps": 2, "freeze_observers_at": 0.5, "freeze_bn_at": 0.75, "observer_momentum": 0.1}
# a short base run (all 1,438 training digits, 3 epochs: 87% top-1, as test_quantize's) and a 1-epoch
# quantization-aware fine-tune of it
BASE = ["--model", "mobilenetv2_050", "--epochs", "3", "--lr", "0.05", "--input-size", "32", "--batch-size", "32", "--workers", "0",
        "--device", "cpu", "--set", "data.hflip=0", "--set", "data.scale=[0.6,1.0]", "--set", "data.crop_pct=1.0", "--set", "schedule.warmup_epochs=0"]


# ---- the arithmetic, against onnxruntime's ------------------------------------------------------------
def test_activation_qparams_are_onnxruntimes():
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    rng = np.random.default_rng(0)
    for lo, hi in [(-1.5, 3.0), (0.0, 6.0), (-4.0, -1.0), (0.2, 0.9), *rng.normal(0, 3, (20, 2)).tolist()]:
        lo, hi = min(lo, hi), max(lo, hi)
        zp, scale = compute_scale_zp(np.array(lo, np.float32), np.array(hi, np.float32), np.array(0, np.uint8), np.array(255, np.uint8))
        got_scale, got_zp = act_qparams(lo, hi)
        assert abs(got_scale - float(scale)) <= 1e-6 * max(1.0, float(scale)) and got_zp == int(zp), (lo, hi)


def test_weight_grid_is_onnxruntimes_reduce_range_per_channel():
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType
    from onnx import TensorProto

    qmin, qmax = get_qmin_qmax_for_qType(TensorProto.INT8, reduce_range=True, symmetric=True)
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    scales = weight_scales(w)
    for c in range(6):
        amax = w[c].abs().max().numpy()
        _, scale = compute_scale_zp(-amax, amax, qmin, qmax, symmetric=True)
        assert abs(float(scale) - float(scales[c])) < 1e-7
    q = fake_quant_weight(w) / scales.view(-1, 1, 1, 1)
    assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= 64 and (q.abs().flatten(1).amax(1) == 64).all()


def test_folded_weight_is_the_int8_folded_convolution():
    """In eval, BN(conv(x, fq(w s) / s)) equals the convolution onnxruntime runs once BN is folded in:
    weights fq(w s), bias beta - mean s."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    bn.eval()
    x = torch.randn(2, 3, 8, 8)
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = fake_quant_weight(conv.weight.detach() * s.view(-1, 1, 1, 1))
    expected = nn.functional.conv2d(x, folded, bn.bias - bn.running_mean * s)
    from torch.nn.utils import parametrize

    parametrize.register_parametrization(conv, "weight", FoldedWeight(bn))
    with torch.no_grad():
        torch.testing.assert_close(bn(conv(x)), expected.detach(), rtol=1e-5, atol=1e-5)


# ---- on a timm student ------------------------------------------------------------------------------
def student() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("mobilenetv2_050", num_classes=10)


def test_plan_keeps_the_stem_and_classifier_float_and_pairs_every_conv_with_its_batchnorm():
    model = student()
    quantized, keep_float, pairs, loose, shared = plan(model, torch.randn(2, 3, 32, 32))
    assert keep_float == ["conv_stem", "classifier"]
    # tensors a functional `+` or the pooling reads are quantized where they are made: each block's last BatchNorm
    # (a residual's `+` reads it; a stage's first block's output the next block's `+` too), the head's, and the
    # output of each residual block that the next block adds to its own
    residual = ["blocks.2.1", "blocks.3.1", "blocks.3.2", "blocks.4.1", "blocks.5.1"]
    assert loose == [f"blocks.{b}.{i}.bn3" for b, n in ((1, 2), (2, 3), (3, 4), (4, 3), (5, 3)) for i in range(n)] + ["bn2"] + residual
    # and the next block's first conv reads it as it is: no observer of its own
    assert sorted(shared) == sorted(f"blocks.{b}.{i}.conv_pw" for b, n in ((1, 2), (2, 3), (3, 4), (4, 3), (5, 3)) for i in range(1, n))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(quantized) == sorted(c for c in convs if c != "conv_stem")
    assert all(pairs[c].startswith(c.rsplit(".", 1)[0]) for c in quantized if "." in c)  # conv_pw -> bn1 in the same block
    assert pairs["conv_head"] == "bn2" and pairs["conv_stem"] == "bn1"
    assert len(pairs) == len(convs)


def test_learnt_clipping_starts_closest_and_trains_its_share():
    """qat.weight_range learnt: each channel's int4 grid ends at a trained share of its max |w|. It starts at the share
    whose grid lies closest to the weights (never farther than the max-based grid, which share 1 is exactly); the
    share and the weights both get gradients; the scale reads back off the quantized weights, as the export does."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g)
    w[0, 0, 0, 0] = 8.0  # one outlier
    share = clip_search(w, 4)
    assert torch.equal(clipped_quant_weight(w, torch.ones(16), 4), fake_quant_weight(w, 4))
    err = lambda q: (q - w).pow(2).flatten(1).sum(1)  # noqa: E731
    assert (err(clipped_quant_weight(w, share, 4)) <= err(fake_quant_weight(w, 4)) + 1e-6).all() and share[0] < 1
    q = clipped_quant_weight(w, share, 4)
    scale = share * w.abs().flatten(1).amax(1) / 7
    assert torch.allclose(q.abs().flatten(1).amax(1) / 7, scale, rtol=1e-6)  # the last level is reached: the export reads s back
    assert torch.allclose(q / scale.view(-1, 1, 1, 1), (q / scale.view(-1, 1, 1, 1)).round(), atol=1e-4)
    fw = FoldedWeight(None, 4, share)
    leaf = w.clone().requires_grad_(True)
    fw(leaf).sin().sum().backward()
    assert fw.clip.grad is not None and (fw.clip.grad != 0).all() and leaf.grad.abs().sum() > 0
    model = student()
    prepare(model, torch.randn(2, 3, 32, 32), {**SETTINGS, "weight_bits": 4, "weight_range": "auto"}, total_steps=8)
    clips = [n for n, _ in model.named_parameters() if n.endswith(".clip")]
    assert len(clips) == 51 and all(".parametrizations.weight." in n for n in clips)  # trained with the weights, dropped by bake
    assert not any(k.endswith(".clip") for k in bake(model)[0])


def test_schedule_taps_and_gradients():
    """Observers watch, then quantize, then freeze; BatchNorm freezes; a tap by module path still fires and
    sees fake-quantized inputs; every trainable weight gets a gradient through the quantizers."""
    model = student()
    prepare(model, torch.randn(2, 3, 32, 32), SETTINGS, total_steps=8)
    state = getattr(model, ATTR)
    seen = {}
    model.blocks[2].register_forward_hook(lambda m, i, o: seen.update(out=o))
    obs = state.observers["blocks/2/0/conv_pw"]
    x = torch.randn(4, 3, 32, 32)
    model.train()
    for step in range(8):
        model(x).sum().backward() if step == 3 else model(x)
        expected = 0 if step < 2 else 1 if step < 4 else 2
        assert int(obs.state) == expected, step
        if step == 3:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "bias" not in n), \
                [n for n, p in model.named_parameters() if p.grad is None]
        if step == 4:
            lo, hi = obs.lo.clone(), obs.hi.clone()
        if step > 4:
            assert torch.equal(obs.lo, lo) and torch.equal(obs.hi, hi)  # frozen
        bn_training = model.blocks[2][0].bn1.training
        assert bn_training == (step < 6), step
    assert "out" in seen
    # the input of a quantized layer is on its uint8 grid
    got = {}
    layer = model.blocks[3][0].conv_pw
    h = layer.register_forward_pre_hook(lambda m, a: got.update(x=a[0]), prepend=False)
    model.eval()
    model(x)
    h.remove()
    scale, zp = state.observers["blocks/3/0/conv_pw"].qparams()
    q = got["x"] / scale + zp
    assert torch.allclose(q, q.round(), atol=1e-3)


def test_ema_copy_has_its_own_observers():
    model = student()
    prepare(model, torch.randn(2, 3, 32, 32), SETTINGS, total_steps=8)
    twin = copy.deepcopy(model)
    layer = twin.get_submodule("blocks.2.0.conv_pw")
    hook = next(h for h in layer._forward_pre_hooks.values())
    assert hook.__self__ is getattr(twin, ATTR).observers["blocks/2/0/conv_pw"]
    assert layer.parametrizations.weight[0].bn is twin.get_submodule("blocks.2.0.bn1")


@pytest.mark.parametrize("bits", [8, 4])
def test_bake_ships_the_plain_architecture_on_the_int8_grid(bits):
    """Also with int4 weights (learnt clipping): onnxruntime rounds their biases onto the same int32 grid when it
    loads the file (its WeightBiasQuantization optimizer), so the simulation does too."""
    model = student()
    report = prepare(model, torch.randn(2, 3, 32, 32), {**SETTINGS, "weight_bits": bits, "weight_range": "auto"}, total_steps=8)
    model.train()
    for _ in range(4):
        model(torch.randn(4, 3, 32, 32))
    model.eval()
    weights, acts = bake(model)
    plain = student()
    plain.load_state_dict(weights, strict=True)  # no parametrization or observer keys
    assert len(acts) == len(getattr(model, ATTR).observers) and all(a["scale"] > 0 for a in acts.values())
    conv, bn = plain.blocks[2][0].conv_pw, plain.blocks[2][0].bn1
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().view(-1, 1, 1, 1)
    w = conv.weight.detach() * s
    q = w / weight_scales(w, bits).view(-1, 1, 1, 1)
    assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= (64 if bits == 8 else 7) + 1e-3
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        rebuilt = attach(copy.deepcopy(plain), acts, report["bias"], bits).eval()
        torch.testing.assert_close(rebuilt(x), model(x), rtol=1e-4, atol=1e-4)  # the fake-quantized model, rebuilt
        # the int32 bias rounding is part of it: without it the outputs move
        assert not torch.allclose(attach(plain, acts).eval()(x), model(x), rtol=1e-4, atol=1e-4)
    # each conv's bias as onnxruntime stores it: round(b / (input scale x weight scale)) on that grid
    conv, bn = rebuilt.blocks[2][0].conv_pw, rebuilt.blocks[2][0].bn1
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = (bn.bias - bn.running_mean * s).detach()
    grid = conv.lcdistill_act_quant.scale * weight_scales((conv.weight * s.view(-1, 1, 1, 1)).detach(), bits)
    h = torch.rand(2, conv.in_channels, 4, 4)
    with torch.no_grad():
        plain_bn = lambda y: nn.functional.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)  # noqa: E731
        y0 = nn.functional.conv2d(conv.lcdistill_act_quant(h), conv.weight)
        torch.testing.assert_close(plain_bn(conv(h)) - plain_bn(y0), ((torch.round(b / grid) * grid) - b).view(1, -1, 1, 1).expand(2, -1, 4, 4),
                                   rtol=0, atol=1e-5)


# ---- the CLI, end to end ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qat_run(digits, tmp_path_factory):
    """(base run, quantization-aware fine-tune of it, its CLI result, the int8 export's result)."""
    base = tmp_path_factory.mktemp("qat-base") / "run"
    cli_ok("train", "--data", digits, *BASE, "--out", base)
    run = tmp_path_factory.mktemp("qat") / "run"
    result = cli_ok("train", "--model", base, "--data", digits, "--quantize", "int8", "--epochs", "1", "--workers", "0", "--device", "cpu",
                    "--out", run)
    exported = cli_ok("export", run, "--format", "onnx", "--quantize", "int8")
    return base, run, result, exported


def test_a_quantization_aware_fine_tune_of_a_run(qat_run):
    base, run, result, _ = qat_run
    text = " ".join(result.stdout.split())  # the console wraps long lines
    assert "qat: int8 as onnxruntime runs it: 51 layers fake-quantized" in text and "float as the export keeps them: conv_stem, classifier" in text
    assert "and 21 outputs a `+` or pooling reads in uint8" in text
    recipe = (run / "recipe.yaml").read_text()
    assert "lr: 0.005" in recipe and "warmup_epochs: 0" in recipe  # a tenth of the base run's lr, no warm-up
    meta = json.loads((run / "student.json").read_text())
    assert meta["qat"]["scheme"] == "int8" and len(meta["qat"]["activations"]) > 40
    start = json.loads((base / "student.json").read_text())["top1"]
    assert meta["top1"] >= start - 2, (start, meta["top1"])  # the fake-quantized student, scored as int8 will run it


def test_the_int8_export_uses_what_it_learnt_and_runs_int8_kernels(qat_run, digits):
    _, run, _, exported = qat_run
    lines = [line for line in exported.stdout.splitlines() if line.startswith("int8:")]
    first, scored, ops = lines
    learnt, total = map(int, re.search(r"(\d+) of the (\d+) activation scales learnt", first).groups())
    assert learnt >= 0.75 * total, first
    agree, seen = map(int, re.search(r"agrees with PyTorch on (\d+) of the (\d+) val images", first).groups())
    assert seen == 359 and agree >= 0.99 * seen, first
    assert "QLinearConv x" in ops and re.search(r"in float Conv x1, Gemm x1$", ops), ops  # only the stem and classifier in float
    got, want = map(float, re.search(r"top-1 % on val ([\d.]+), the fake-quantized PyTorch model ([\d.]+)", scored).groups())
    assert abs(got - want) <= 0.3 + 1e-9, scored
    from lcdistill import exporters

    how = exporters.read_onnx_metadata(run / "student.int8.onnx")["quantization"]
    assert how["method"] == "quantization-aware"
    assert "learnt in training" in how["activation_scales"]


def test_eval_measures_the_base_runs_files_beside_the_quantization_aware_ones(qat_run, digits):
    base, run, _, _ = qat_run
    cli_ok("export", base, "--format", "onnx", "--quantize", "int8")
    result = cli_ok("eval", run, "--data", digits, "--json", "--no-teacher", "--batch-size", "32", "--workers", "0", "--device", "cpu")
    rows = json.loads(result.stdout)
    assert list(rows) == ["student", "onnx", "onnx-int8 qat", "base onnx", "base onnx-int8"]
    assert rows["base onnx-int8"]["model"] == str(base / "student.int8.onnx") and rows["onnx-int8 qat"]["file_bytes"] < rows["onnx"]["file_bytes"]
    assert all(r["latency_ms_b1"] > 0 and r["latency_ms_batch"] > 0 for r in rows.values())


def test_int4_weights_train_and_export_on_their_own_grid(qat_run, digits, tmp_path):
    """qat.weight_bits=4: the weights trained on a symmetric int4 grid ([-7, 7] per channel), exported as
    student.w4a8.onnx with those very scales: its dequantized weights are the trained ones (BatchNorm folded),
    and it agrees with the fake-quantized model; post-training the same width is --weight-bits 4."""
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    q = fake_quant_weight(w, 4) / weight_scales(w, 4).view(-1, 1)
    assert torch.allclose(q, q.round(), atol=1e-5) and torch.allclose(q.abs().amax(1), torch.full((4,), 7.0))
    base, _, _, _ = qat_run
    run = tmp_path / "w4"
    cli_ok("train", "--model", base, "--data", digits, "--quantize", "int8", "--set", "qat.weight_bits=4", "--epochs", "1", "--workers", "0",
           "--device", "cpu", "--out", run)
    exported = cli_ok("export", run, "--format", "onnx", "--quantize", "int8")
    first, scored, ops = [line for line in exported.stdout.splitlines() if line.startswith("int8:")]
    assert "student.w4a8.onnx" in first and "DequantizeLinear feed float convolutions" in ops, ops
    # the biases rounded as onnxruntime rounds them when it loads the file: 354/359 and top-1 1.4 apart before
    agree, seen = map(int, re.search(r"agrees with PyTorch on (\d+) of the (\d+) val images", first).groups())
    assert seen == 359 and agree >= 0.99 * seen, first
    got, want = map(float, re.search(r"top-1 % on val ([\d.]+), the fake-quantized PyTorch model ([\d.]+)", scored).groups())
    assert abs(got - want) <= 0.3 + 1e-9, scored
    from lcdistill import exporters

    how = exporters.read_onnx_metadata(run / "student.w4a8.onnx")["quantization"]
    assert how["weight_bits"] == 4 and how["method"] == "quantization-aware"
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(run / "student.w4a8.onnx")).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    made = {o: n for n in graph.node for o in n.output}
    model = artifacts_model(run)
    conv, bn = model.blocks[1][0].conv_dw, model.blocks[1][0].bn2
    folded = (conv.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(-1, 1, 1, 1)).detach().numpy()
    dq = made[next(n for n in graph.node if n.op_type == "Conv" and n.name.endswith("blocks.1.0/conv_dw/Conv")).input[1]]
    ints, scales = values[dq.input[0]].astype(np.float32), values[dq.input[1]]
    assert ints.min() >= -7 and ints.max() <= 7
    np.testing.assert_allclose(ints * scales.reshape(-1, 1, 1, 1), folded, rtol=0, atol=1e-6)
    proc = cli("export", run, "--format", "onnx", "--quantize", "int8", "--weight-bits", "8", "--out", tmp_path / "x")
    assert_user_error(proc, "trained quantization-aware for 4-bit weights", "--weight-bits", run_dir=tmp_path / "x")


def artifacts_model(run) -> nn.Module:
    from lcdistill import artifacts

    return artifacts.identify(str(run)).loaded.model.eval()
