"""`lcdistill export --format hub` and `lcdistill push`: a folder timm (or torchvision) loads as it is,
with a model card, checked in a fresh interpreter that never imports lcdistill."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import EVAL, FAST, assert_user_error, cli, cli_ok, cli_process, subprocess_env
from lcdistill import artifacts, hubfolder
from lcdistill.checkpoint import load_weights
from lcdistill.errors import UserError

N_IMAGES = 8


@pytest.fixture(scope="session")
def timm_hub(compress_run, tmp_path_factory):
    """A copy of the LONDON student's run folder (with an eval.json), exported with --format hub."""
    run = tmp_path_factory.mktemp("hub") / "run"
    shutil.copytree(compress_run("london"), run)
    return run, cli_ok("export", run, "--format", "hub")


@pytest.fixture(scope="session")
def tv_run(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tv") / "run"
    cli_ok("train", "--model", "tv:mobilenet_v3_small", "--data", small_data, *FAST, "--out", out)
    return out


def val_files(data: Path, n: int = N_IMAGES) -> list[str]:
    """n val images, one class after another, as files a user would have."""
    files = sorted(str(p) for p in (data / "val").rglob("*.png"))
    return files[:: max(1, len(files) // n)][:n]


def lcdistill_logits(run: Path, files: list[str]) -> torch.Tensor:
    """What lcdistill predicts for the files: its own eval pipeline and the run's student."""
    from lcdistill.data import normalize
    from lcdistill.data.folder import Split

    target = artifacts.identify(run)
    meta = target.meta
    dataset = target.task.eval_dataset(Split(meta["classes"], [(f, 0) for f in files]), meta)
    images = torch.stack([dataset[i][0] for i in range(len(files))])
    with torch.no_grad():
        return target.predict(normalize(images, meta["mean"], meta["std"]))


def fresh_process(script: str, tmp_path: Path) -> torch.Tensor:
    """Run script in a new interpreter (no lcdistill import allowed); it writes logits.pt."""
    guard = "import sys\nsys.modules['lcdistill'] = None  # the folder must load without lcdistill\n"
    code = guard + textwrap.dedent(script)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    return torch.load(tmp_path / "logits.pt")


# ---- the folder --------------------------------------------------------------------------------
def test_hub_folder_files_and_config(timm_hub):
    run, result = timm_hub
    hub = run / "hub"
    assert sorted(p.name for p in hub.iterdir()) == sorted(hubfolder.FILES)
    assert f"hub: {hub}" in result.stdout
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"
    meta = json.loads((run / "student.json").read_text())
    cfg = json.loads((hub / "config.json").read_text())
    assert cfg["architecture"] == meta["arch"]["name"] == "mobilenetv2_050"
    assert cfg["num_classes"] == 10 and cfg["label_names"] == meta["classes"]
    pre = cfg["pretrained_cfg"]
    assert pre["mean"] == meta["mean"] and pre["std"] == meta["std"]
    assert pre["input_size"] == meta["input_size"] and pre["crop_pct"] == meta["crop_pct"] and pre["interpolation"] == meta["interpolation"]
    assert pre["num_classes"] == 10
    state = load_weights(hub / "model.safetensors")
    own = load_weights(run / "student.safetensors")
    assert state.keys() == own.keys() and all(torch.equal(state[k], own[k]) for k in own)


def test_timm_loads_the_folder_in_a_fresh_process(timm_hub, small_data, tmp_path):
    run, _ = timm_hub
    files = val_files(small_data)
    got = fresh_process(f"""
        import timm, torch
        from PIL import Image
        model = timm.create_model("local-dir:{run / 'hub'}", pretrained=True).eval()
        assert model.pretrained_cfg["label_names"] == [str(i) for i in range(10)]
        transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
        batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in {files!r}])
        with torch.no_grad():
            torch.save(model(batch), "logits.pt")
    """, tmp_path)
    expected = lcdistill_logits(run, files)
    assert got.shape == expected.shape == (N_IMAGES, 10)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_card_says_what_it_is(timm_hub, teacher_run):
    run, _ = timm_hub
    card = (run / "hub" / "README.md").read_text()
    meta = json.loads((run / "student.json").read_text())
    assert card.startswith("---\n") and "library_name: timm" in card and "pipeline_tag: image-classification" in card
    for text in ("mobilenetv2_050", meta["teacher"]["origin"], "`london`", "LONDON", "200 train / 60 val images, 10 classes",
                 f"{meta['top1']:.2f}", "local-dir:", "hf-hub:ORG/NAME", "```yaml", "method: london"):
        assert text in card, text
    assert "| teacher |" in card and "| student |" in card  # no eval.json: the run's own table


def test_card_takes_the_eval_table(timm_hub, small_data, tmp_path):
    run, _ = timm_hub
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("hub"))
    cli_ok("eval", copy, "--data", small_data, *EVAL, "--no-teacher", "--save", copy / "eval.json")
    cli_ok("export", copy, "--format", "hub")
    card = (copy / "hub" / "README.md").read_text()
    latency = json.loads((copy / "eval.json").read_text())["student"]["latency_ms_b1"]
    assert "ms @1" in card and f"{latency:.2f}" in card


def test_torchvision_student_loads_with_torchvision(tv_run, small_data, tmp_path):
    out = tmp_path / "files"
    result = cli_ok("export", tv_run, "--format", "hub", "--out", out)
    hub = out / "hub"
    assert "hub:" in result.stdout
    cfg = json.loads((hub / "config.json").read_text())
    assert cfg["library_name"] == "torchvision" and cfg["architecture"] == "mobilenet_v3_small"
    card = (hub / "README.md").read_text()
    assert 'torchvision.models.get_model("mobilenet_v3_small", num_classes=10)' in card
    files = val_files(small_data)
    pre = cfg["pretrained_cfg"]
    got = fresh_process(f"""
        import json, torch, torchvision
        import torchvision.transforms as T
        from PIL import Image
        from safetensors.torch import load_file
        folder = "{hub}"
        cfg = json.load(open(folder + "/config.json"))
        model = torchvision.models.get_model(cfg["architecture"], num_classes=cfg["num_classes"])
        model.load_state_dict(load_file(folder + "/model.safetensors"))
        model.eval()
        transform = T.Compose([T.Resize({int(pre['input_size'][-1] / pre['crop_pct'])}, interpolation=T.InterpolationMode.{pre['interpolation'].upper()}),
                               T.CenterCrop({pre['input_size'][-1]}), T.ToTensor(), T.Normalize({pre['mean']}, {pre['std']})])
        batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in {files!r}])
        with torch.no_grad():
            torch.save(model(batch), "logits.pt")
    """, tmp_path)
    expected = lcdistill_logits(tv_run, files)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def python_block(card: str, after: str) -> str:
    """The first ```python block of the card after the text `after`."""
    rest = card[card.index(after):]
    return rest.split("```python\n", 1)[1].split("```", 1)[0]


def test_segmentation_student_card_and_folder(tmp_path):
    """A segmentation student: timm cannot build it; the card's torchvision code does (run as written, in a
    fresh process), lcdistill's loader does too, and model.safetensors carries the arch spec."""
    from lcdistill import models, tasks

    task = tasks.get("segmentation")
    classes = ["background", "a", "b", "c"]
    torch.manual_seed(0)
    loaded = task.resolve("tv:lraspp_mobilenet_v3_large", len(classes), pretrained=False, keep_head=False)
    model = loaded.model.eval()
    meta = models.model_meta(loaded, classes, [3, 64, 64], {**task.metadata(classes), "method": "kd", "miou": 12.5, "pixel_acc": 60.0})
    text = hubfolder.card(meta, task, {"dataset": "scenes", "sizes": "8 train / 4 val images, 4 classes"}, None, None, None)
    out = hubfolder.write(model, meta, tmp_path / "hub", text)
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-segmentation" in card and "mIoU %" in card and "12.50" in card
    assert "lraspp_mobilenet_v3_large" in card and "models.load_run" in card
    assert models.read_meta(out / "model.safetensors")["arch"] == meta["arch"]
    assert json.loads((out / "config.json").read_text())["lcdistill_arch"] == meta["arch"]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = task.exportable(model)(x)
        assert torch.equal(hubfolder.load(out)(x), expected)  # lcdistill's own loader, as the card says
    torch.save(x, tmp_path / "x.pt")
    code = python_block(card, "With torchvision alone").replace('snapshot_download("ORG/NAME")', repr(str(out)))
    got = fresh_process("import torch\nx = torch.load('x.pt')\n" + code + "\ntorch.save(logits, 'logits.pt')\n", tmp_path)
    assert got.shape == expected.shape == (2, 4, 64, 64)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_hub_folder_is_replaced_whole_and_foreign_folders_are_refused(compress_run, tmp_path):
    run = compress_run("ce")
    cli_ok("export", run, "--format", "hub", "--out", tmp_path)
    first = (tmp_path / "hub" / "model.safetensors").stat().st_ino
    cli_ok("export", run, "--format", "hub", "--out", tmp_path)
    assert (tmp_path / "hub" / "model.safetensors").stat().st_ino != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]
    foreign = tmp_path / "other"
    (foreign / "hub").mkdir(parents=True)
    (foreign / "hub" / "notes.txt").write_text("mine")
    assert_user_error(cli("export", run, "--format", "hub", "--out", foreign), "not a hub folder")
    assert (foreign / "hub" / "notes.txt").read_text() == "mine"


def test_format_all_includes_pt2_and_hub(compress_run, tmp_path):
    result = cli_ok("export", compress_run("ce"), "--format", "all", "--out", tmp_path)
    assert {"student.onnx", "student.pt", "student.pt2", "hub"} <= {p.name for p in tmp_path.iterdir()}
    for fmt in ("onnx:", "torchscript:", "pt2:", "hub:"):
        assert any(line.startswith(fmt) for line in result.stdout.splitlines()), fmt


# ---- push ----------------------------------------------------------------------------------
def push_env(tmp_path: Path, **extra: str) -> dict:
    env = subprocess_env(HF_HOME=str(tmp_path / "hf-home"), **extra)  # no cached token from this machine
    env.pop("HF_TOKEN", None)
    env.pop("HUGGING_FACE_HUB_TOKEN", None)
    env.update(extra)
    return env


def test_push_without_a_token_fails_in_one_line(timm_hub, tmp_path):
    run, _ = timm_hub
    start = time.monotonic()
    proc = cli_process("push", run, "--repo", "someone/digits-student", env=push_env(tmp_path), timeout=120)
    assert_user_error(proc, "token", "nothing was uploaded")
    assert time.monotonic() - start < 60


def test_push_offline_fails_in_seconds(timm_hub, tmp_path):
    run, _ = timm_hub
    start = time.monotonic()
    proc = cli_process("push", run / "hub", "--repo", "someone/digits-student", "--private",
                       env=push_env(tmp_path, HF_TOKEN="hf_notarealtoken", HF_HUB_OFFLINE="1"), timeout=120)
    assert_user_error(proc, "unreachable", "nothing was uploaded")
    assert time.monotonic() - start < 60  # the interpreter's start-up included; no network retries


def test_push_refuses_a_bad_repo_id_and_a_non_run(timm_hub, tmp_path):
    run, _ = timm_hub
    assert_user_error(cli("push", run, "--repo", "no-owner"), "ORG/NAME")
    assert_user_error(cli("push", tmp_path, "--repo", "someone/x"), str(tmp_path.name))


def test_slim_detector_card_builds_it_with_torchvision_alone(tmp_path):
    """det:FCOS with a narrower FPN and fewer head convs (student.kwargs fpn_channels, head_convs): the card's
    torchvision code rebuilds it in a fresh process, loads model.safetensors strictly and detects the same."""
    from lcdistill import models, tasks

    task = tasks.get("detection")
    classes = ["a", "b", "c"]
    torch.manual_seed(0)
    loaded = task.resolve("det:FCOS:mobilenet_v3_small", len(classes), pretrained=False, keep_head=False,
                          kwargs={"fpn_channels": 64, "head_convs": 1, "min_size": 64, "max_size": 64})
    model = loaded.model.eval()
    assert model.backbone.out_channels == 64 and len(model.head.classification_head.conv) == 3  # conv, GroupNorm, ReLU once
    meta = models.model_meta(loaded, classes, [3, 64, 64], {**task.metadata(classes), "method": "kd", "map": 1.0, "map_50": 2.0})
    text = hubfolder.card(meta, task, {"dataset": "scenes", "sizes": "8 train / 4 val images, 3 classes"}, None, None, None)
    out = hubfolder.write(model, meta, tmp_path / "hub", text)
    x = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model([x])[0]["scores"]
    code = python_block((out / "README.md").read_text(), "With torchvision alone").replace('snapshot_download("ORG/NAME")', repr(str(out)))
    got = fresh_process("import torch\nx = torch.load('x.pt')\n" + code
                        + "\nwith torch.no_grad():\n    torch.save(model.eval()([x])[0]['scores'], 'logits.pt')\n", tmp_path)
    torch.testing.assert_close(got, expected)


def test_head_convs_is_an_fcos_setting():
    from lcdistill import tasks

    with pytest.raises(UserError, match="head_convs"):
        tasks.get("detection").resolve("det:RetinaNet:resnet18", 3, pretrained=False, keep_head=False, kwargs={"head_convs": 2})
