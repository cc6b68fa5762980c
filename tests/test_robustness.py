"""`lcdistill eval --robustness`: the metric under seeded Gaussian noise and one-step FGSM, on real digits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import EVAL, FAST, assert_user_error, cli, cli_ok
from lcdistill import artifacts, robustness, tasks
from lcdistill.data import eval_loader, normalize
from lcdistill.defaults import FGSM_EPSILONS, NOISE_SIGMAS

CPU = torch.device("cpu")
# Two epochs of timm's tiny test_resnet on all 1,438 training digits: ~97% top-1 in ~20 s. A trained
# model matters: noise and FGSM move an untrained model's near-random guesses very little.
TRAIN = ["--model", "test_resnet", "--epochs", "2", "--lr", "0.05", "--input-size", "32", "--batch-size", "32", "--workers", "0",
         "--device", "cpu", "--set", "data.hflip=0", "--set", "data.scale=[0.6,1.0]", "--set", "data.crop_pct=1.0",
         "--set", "schedule.warmup_epochs=0"]


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """A trained classifier run folder with its ONNX export inside."""
    run = tmp_path_factory.mktemp("robust-trained") / "run"
    cli_ok("train", "--data", digits, *TRAIN, "--out", run)
    cli_ok("export", run, "--format", "onnx")
    return run


@pytest.fixture(scope="module")
def distilled(trained, small_data, tmp_path_factory):
    """A one-epoch kd student of the trained run: eval measures its teacher beside it."""
    out = tmp_path_factory.mktemp("robust-kd") / "run"
    cli_ok("compress", "--teacher", trained, "--student", "test_efficientnet", "--data", small_data, "--method", "kd", *FAST, "--out", out)
    return out


# ---- the perturbations ---------------------------------------------------------------------
def test_noise_is_added_in_pixel_units_and_clipped():
    images = torch.rand(5, 3, 8, 8)
    (noisy, label), = robustness.with_noise([(images, torch.arange(5))], 0.1, seed=0)
    expected = images + 0.1 * torch.stack([robustness.unit_noise(0, i, (3, 8, 8)) for i in range(5)])
    inside = (expected >= 0) & (expected <= 1)
    assert torch.equal(noisy[inside], expected[inside]) and torch.equal(label, torch.arange(5))
    assert noisy.min() >= 0 and noisy.max() <= 1 and not inside.all()  # some pixels were clipped
    assert not torch.equal(robustness.unit_noise(0, 0, (3, 8, 8)), robustness.unit_noise(1, 0, (3, 8, 8)))
    assert not torch.equal(robustness.unit_noise(0, 0, (3, 8, 8)), robustness.unit_noise(0, 1, (3, 8, 8)))


def test_sigma_zero_is_clean_and_large_sigma_hurts(trained, digits):
    r = robustness.measure_run(trained, digits, sigmas=(0.0, 0.5), epsilons=())["student"]
    assert r["metric"] == "top1" and r["clean"] >= 90 and "fgsm" not in r
    assert r["noise"]["0"] == r["clean"]
    assert r["noise"]["0.5"] <= r["clean"] - 30, r


def test_same_seed_same_numbers_whatever_the_batch_size(trained, small_data):
    sigmas, epsilons = (0.3, 0.5), (2 / 255,)
    first = robustness.measure_run(trained, small_data, sigmas=sigmas, epsilons=epsilons)
    assert robustness.measure_run(trained, small_data, sigmas=sigmas, epsilons=epsilons) == first
    # noise is drawn per image, not per batch
    assert robustness.measure_run(trained, small_data, batch_size=7, sigmas=sigmas, epsilons=())["student"]["noise"] == first["student"]["noise"]


def test_fgsm_matches_a_plain_reimplementation(trained, digits):
    eps = 4 / 255
    target = artifacts.identify(trained)
    dataset = target.task.eval_dataset(target.task.scan(digits).val, target.meta)
    picked = [dataset[i] for i in range(0, len(dataset), 6)]  # every class
    images, labels = torch.stack([p[0] for p in picked]), torch.tensor([p[1] for p in picked])
    result = robustness.measure(target, [(images, labels)], CPU, sigmas=(), epsilons=(eps,))
    model = target.module
    assert not model.training and all(p.grad is None for p in model.parameters())  # only the input's gradient

    # FGSM written out: CE's gradient w.r.t. the [0, 1] image, its sign, one step, clip, then normalise
    mean = torch.tensor(target.meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(target.meta["std"]).view(1, 3, 1, 1)
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model((x - mean) / std), labels), x)
    adversarial = torch.clamp(images + eps * grad.sign(), 0, 1)
    with torch.no_grad():
        clean_hits = (model((images - mean) / std).argmax(1) == labels).sum().item()
        hits = (model((adversarial - mean) / std).argmax(1) == labels).sum().item()

    ours = robustness.fgsm(target.predict, lambda p, y: target.task.loss(p, y, {"label_smoothing": 0.0}), images, labels,
                           target.meta["mean"], target.meta["std"], eps)
    assert torch.equal(ours, adversarial)
    assert result["clean"] == 100.0 * clean_hits / len(labels)
    assert result["fgsm"][robustness.key(eps)] == 100.0 * hits / len(labels)
    assert hits < clean_hits  # the attack does something


def test_onnx_export_gets_the_same_noise(trained, digits):
    sigma, predicted = 0.4, {}
    for path in (trained, trained / "student.onnx"):  # each fed by its own loader, as eval does
        target = artifacts.identify(path)
        loader = eval_loader(target.task.eval_dataset(target.task.scan(digits).val, target.meta), 64, 0)
        with torch.no_grad():
            predicted[target.runtime] = torch.cat([target.predict(normalize(x, target.meta["mean"], target.meta["std"])).argmax(1)
                                                   for x, *_ in robustness.with_noise(loader, sigma, seed=0)])
    assert (predicted["pytorch"] == predicted["onnx"]).float().mean() >= 0.99  # same noisy pixels, parity-exact export

    student = robustness.measure_run(trained, digits, sigmas=(sigma,), epsilons=())["student"]
    onnx = robustness.measure_run(trained / "student.onnx", digits, sigmas=(sigma,), epsilons=FGSM_EPSILONS)["student"]
    assert "fgsm" not in onnx  # no gradient through an exported file
    assert onnx["noise"]["0.4"] <= onnx["clean"] - 5  # the noise matters here
    assert onnx["noise"]["0.4"] == pytest.approx(student["noise"]["0.4"], abs=0.6), (onnx, student)  # 359 images: two flips on near ties


def test_segmentation_noise_and_fgsm():
    torch.manual_seed(0)
    task = tasks.get("segmentation")
    model = torch.nn.Conv2d(3, 3, 3, padding=1).eval()
    meta = {"classes": ["bg", "a", "b"], "mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, 16, 16]}
    masks = torch.randint(0, 3, (4, 16, 16))
    masks[:, :2] = 255  # ignored pixels
    r = robustness.measure(artifacts.InMemory(model, meta, task), [(torch.rand(4, 3, 16, 16), masks)], CPU, sigmas=(0.0, 0.3), epsilons=(8 / 255,))
    assert r["metric"] == "miou" and r["noise"]["0"] == r["clean"]
    assert 0 <= r["fgsm"]["0.0313725"] <= 100 and all(p.grad is None for p in model.parameters())


# ---- the CLI and the report ----------------------------------------------------------------
@pytest.fixture(scope="module")
def robust_eval(distilled, small_data, tmp_path_factory):
    """`lcdistill eval KD_RUN --noise 0,0.3 --fgsm 2/255 --save FILE`: (saved JSON, printed tables)."""
    saved = tmp_path_factory.mktemp("robust-eval") / "eval.json"
    result = cli_ok("eval", distilled, "--data", small_data, "--noise", "0,0.3", "--fgsm", "2/255", "--save", saved, *EVAL, "--batch-size", "16")
    return json.loads(saved.read_text()), result.stdout


def test_eval_noise_and_fgsm_options(robust_eval):
    evaluation, printed = robust_eval
    assert set(evaluation) == {"student", "teacher"}
    for role, r in evaluation.items():
        rob = r["robustness"]
        assert rob["clean"] == r["top1"] == rob["noise"]["0"], role  # the same images and pipeline as the main table
        assert set(rob["noise"]) == {"0", "0.3"} and set(rob["fgsm"]) == {robustness.key(2 / 255)}, role
    assert evaluation["teacher"]["robustness"]["noise"]["0.3"] < evaluation["teacher"]["top1"]
    assert "noise 0.3" in printed and "FGSM 2/255" in printed and "teacher" in printed


def test_eval_robustness_json_has_the_keys(trained, small_data):
    result = cli_ok("eval", trained, "--data", small_data, "--robustness", "--json", *EVAL, "--batch-size", "16")
    evaluation = json.loads(result.stdout)
    assert set(evaluation) == {"student", "onnx"}
    student, onnx = evaluation["student"]["robustness"], evaluation["onnx"]["robustness"]
    assert set(student) == {"metric", "seed", "clean", "noise", "fgsm"} and "fgsm" not in onnx
    assert list(student["noise"]) == list(onnx["noise"]) == [robustness.key(s) for s in NOISE_SIGMAS]
    assert list(student["fgsm"]) == [robustness.key(e) for e in FGSM_EPSILONS]
    assert "robustness" not in json.loads(cli_ok("eval", trained, "--data", small_data, "--json", *EVAL).stdout)["student"]


@pytest.mark.parametrize("flag,value,word", [("--noise", "-1", "outside"), ("--noise", "0.1,x", "not a number"), ("--fgsm", "inf", "not a number")])
def test_eval_refuses_bad_levels(trained, small_data, flag, value, word):
    assert_user_error(cli("eval", trained, "--data", small_data, flag, value, *EVAL), flag, word)


def test_report_shows_robustness(robust_eval, distilled, tmp_path):
    evaluation, _ = robust_eval
    run = shutil.copytree(distilled, tmp_path / "run")
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    result = cli_ok("report", run, "--eval", tmp_path / "eval.json")
    assert f"plot: {run / 'plots' / 'robustness.png'}" in result.stdout
    assert (run / "plots" / "robustness.png").read_bytes().startswith(b"\x89PNG")
    page = (run / "report.html").read_text()
    assert "<h2>Robustness</h2>" in page and "FGSM 2/255" in page
    assert f"<td>{evaluation['teacher']['robustness']['noise']['0.3']:.2f}</td>" in page
