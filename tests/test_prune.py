"""--student prune:R: the teacher cut to at most R of its FLOPs (Torch-Pruning), described as JSON, rebuilt
with torch alone, distilled like any student."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import EVAL, FAST, assert_user_error, cli, cli_ok, cli_process, subprocess_env
from lcdistill import models, prune, recipe as recipes, tasks
from lcdistill.measure import flops
from lcdistill.models.pruned import PRUNED, describe

SETTINGS = recipes.default_recipe()["prune"]


def cut(spec: str, task: str, size: int, ratio: float, classes: int = 10, **settings):
    t = tasks.get(task)
    torch.manual_seed(0)
    teacher = t.resolve(spec, classes, role="teacher", pretrained=False)
    t.configure(teacher, size)
    return teacher, prune.cut(teacher, ratio, {**SETTINGS, **settings}, t, size), t


@pytest.fixture(scope="module")
def blocker(tmp_path_factory) -> Path:
    """A folder that, first on PYTHONPATH, makes `import torch_pruning` fail: the rebuild must not need it."""
    root = tmp_path_factory.mktemp("no-pruner")
    (root / "torch_pruning").mkdir()
    (root / "torch_pruning" / "__init__.py").write_text("raise ImportError('torch_pruning is blocked in this test')\n")
    return root


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_the_cut_keeps_at_most_r_of_the_flops_in_multiples_of_8(ratio):
    teacher, done, task = cut("resnet18", "classification", 32, ratio)
    example = task.export.example({"input_size": [3, 32, 32]}, 1)
    assert flops(done.student.model, example) == done.flops <= ratio * flops(teacher.model, example) == ratio * done.teacher_flops
    assert done.flops > 0.6 * ratio * done.teacher_flops  # cut to the budget, not far past it
    convs = [m for n, m in done.student.model.named_modules() if isinstance(m, torch.nn.Conv2d) and n != "conv1"]
    assert all(m.out_channels % 8 == 0 for m in convs)
    assert done.student.model.fc.out_features == 10 and done.student.model.fc.in_features < 512  # the class layer keeps its outputs
    assert sum(p.numel() for p in done.student.model.parameters()) < teacher.params


@pytest.mark.parametrize("spec,task,size", [
    ("efficientnet_b0", "classification", 32),  # depthwise convs, squeeze-excite, timm's BatchNormAct2d
    ("tv:mobilenet_v3_small", "classification", 32),  # torchvision's SqueezeExcitation, hardswish
    ("smp:FPN:resnet18", "segmentation", 64),  # GroupNorm decoder: cut without round_to
    ("tv:deeplabv3_mobilenet_v3_large", "segmentation", 64),  # the aux head, traced with the main one
    ("det:RetinaNet:resnet18", "detection", 64),  # FPN kept, class and box layers kept
])
def test_every_task_s_models_are_cut_and_rebuilt_from_their_json_bit_for_bit(spec, task, size):
    teacher, done, t = cut(spec, task, size, 0.5, classes=11 if task == "segmentation" else 10)
    assert done.share <= 0.5
    arch = json.loads(json.dumps(done.student.arch))  # what student.json holds
    rebuilt = models.build(arch, done.student.num_classes)
    rebuilt.load_state_dict(done.student.model.state_dict())  # strict: every shape fits
    x = t.export.example({"input_size": [3, size, size]}, 1)
    with torch.no_grad():
        want, got = done.student.model.eval()(x), rebuilt.eval()(x)
    flat = lambda o: [o] if isinstance(o, torch.Tensor) else [t for v in (o.values() if isinstance(o, dict) else o) for t in flat(v)]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(flat(want), flat(got), strict=True))


def test_timm_s_cached_widths_follow_the_cut_so_stage_terms_still_find_every_stage():
    teacher, done, _ = cut("resnet18", "classification", 32, 0.5)
    model = done.student.model
    assert model.num_features == model.fc.in_features < 512
    found = models.find_stages(model, 32)
    assert [s.name for s in found] == [s.name for s in models.find_stages(teacher.model, 32)]
    wide = {s.name: s.channels for s in models.find_stages(teacher.model, 32)}
    assert all(s.channels == model.get_submodule(s.name)[-1].bn2.num_features < wide[s.name] for s in found if s.name.startswith("layer"))


def test_a_fresh_process_rebuilds_the_cut_without_the_pruner_bit_for_bit(blocker, tmp_path):
    _, done, _ = cut("mobilenetv2_050", "classification", 32, 0.5)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    torch.set_num_threads(1)
    want = done.student.model.eval()(x).detach()
    (tmp_path / "arch.json").write_text(json.dumps(done.student.arch))
    save_file({**done.student.model.state_dict(), "__x": x}, tmp_path / "w.safetensors")
    script = ("import json, sys, torch\nfrom safetensors.torch import load_file, save_file\nfrom lcdistill import models\n"
              "torch.set_num_threads(1)\nw = load_file(sys.argv[1] + '/w.safetensors'); x = w.pop('__x')\n"
              "m = models.build(json.load(open(sys.argv[1] + '/arch.json')), 10); m.load_state_dict(w)\n"
              "assert 'torch_pruning' not in sys.modules\n"
              "save_file({'y': m.eval()(x).detach()}, sys.argv[1] + '/y.safetensors')\n")
    env = subprocess_env(PYTHONPATH=f"{blocker}:{Path(__file__).resolve().parents[1]}")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(load_file(tmp_path / "y.safetensors")["y"], want)


# ---- the command line ------------------------------------------------------------------------------
PRUNE = ["--student", "prune:0.5", "--method", "london", "--epochs", "2", "--batch-size", "16", "--workers", "0",
         "--checkpoint-every", "3", "--input-size", "32", "--device", "cpu", "--set", "data.crop_pct=1.0",
         "--set", "train.deterministic=true", "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def pruned_run(teacher_run, small_data, tmp_path_factory) -> Path:
    """The teacher cut to half its FLOPs and distilled from it with kd+london, in a fresh interpreter (the
    unbroken run the stopped one must reproduce)."""
    out = tmp_path_factory.mktemp("pruned") / "run"
    proc = cli_process("compress", "--teacher", teacher_run, "--data", small_data, *PRUNE, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "cut from the teacher: 41 layers narrowed" in proc.stdout, proc.stdout
    return out


def test_a_cut_student_is_distilled_evaluated_and_exported_like_any_student(pruned_run, teacher_run, small_data, tmp_path):
    meta = json.loads((pruned_run / "student.json").read_text())
    assert meta["arch"]["source"] == "pruned" and meta["arch"]["kwargs"]["base"]["name"] == "resnet18"
    assert meta["params"] < 0.6 * json.loads((teacher_run / "student.json").read_text())["params"]
    recipe = recipes.read_yaml(pruned_run / "recipe.yaml")
    assert recipe["student"] == {**recipe["student"], "source": "prune", "name": "0.5"}
    log = [json.loads(line) for line in (pruned_run / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("lip", 0) > 0 for row in log)  # the Lipschitz term found the cut's stages, paired one to one
    shown = cli_ok("eval", pruned_run, "--data", small_data, *EVAL).stdout
    assert f"{meta['top1']:.2f}" in shown
    out = tmp_path / "export"
    shown = cli_ok("export", pruned_run, "--format", "all", "--out", out).stdout
    assert {"student.onnx", "student.pt", "student.pt2", "hub"} <= {p.name for p in out.iterdir()}, shown
    card = (out / "hub" / "README.md").read_text()  # the card loads it with lcdistill (no library builds a cut model alone)
    assert 'models.load_run(f"{folder}/model.safetensors")' in card
    loaded = models.load_run(out / "hub" / "model.safetensors")
    assert loaded.arch == meta["arch"] and loaded.params == meta["params"]


def test_a_stopped_cut_run_resumes_without_the_pruner_to_the_unbroken_one(pruned_run, teacher_run, small_data, blocker, tmp_path):
    from test_resume import assert_same_run, start, stop_after_a_step

    out = tmp_path / "run"
    proc = start("--teacher", teacher_run, "--data", small_data, *PRUNE, "--out", out)
    state = stop_after_a_step(proc, out, signal.SIGTERM, group=False, code=143)
    assert state["epoch"] == 0 and state["global_step"] >= 1
    env = subprocess_env(PYTHONPATH=f"{blocker}:{Path(__file__).resolve().parents[1]}")
    proc = cli_process("compress", "--resume", out, env=env)
    assert proc.returncode == 0, proc.stderr
    assert_same_run(out, pruned_run)


@pytest.mark.parametrize("student,extra,words", [
    ("prune:0", [], ["prune:0", "between 0 and 1"]),
    ("prune:1", [], ["prune:1", "between 0 and 1"]),
    ("prune:half", [], ["prune:half", "between 0 and 1"]),
    ("prune:0.5", ["--set", "student.weights=w.safetensors"], ["--weights", "teacher's own weights"]),
    ("prune:0.5", ["--init", "w.safetensors"], ["--init", "teacher's own weights"]),
    ("prune:0.5", ["--set", "prune.importance=taylor"], ["prune.importance"]),
    ("prune:0.5", ["--set", "prune.steps=0"], ["prune.steps"]),
    ("prune:0.5", ["--set", "prune.keep=[nowhere]"], ["prune.keep", "nowhere"]),
    ("prune:0.001", [], ["stops at", "larger R"]),
])
def test_bad_cuts_are_one_line_and_write_nothing(student, extra, words, teacher_run, small_data, tmp_path):
    proc = cli("compress", "--teacher", teacher_run, "--student", student, "--data", small_data, *FAST, *extra, "--out", tmp_path / "r")
    assert_user_error(proc, *words, run_dir=tmp_path / "r")


def test_a_cut_needs_a_teacher(small_data, tmp_path):
    proc = cli("compress", "--student", "prune:0.5", "--method", "ce", "--data", small_data, *FAST, "--out", tmp_path / "r")
    assert_user_error(proc, "prune:0.5 cuts the teacher", "--teacher", run_dir=tmp_path / "r")


def test_a_teacher_the_cut_cannot_describe_is_refused_naming_it(small_data, tmp_path):
    """convnext's LayerNorm2d and layer-scale gammas are resized by the pruner but not by the JSON rebuild."""
    import timm

    weights = tmp_path / "convnext.safetensors"
    save_file(timm.create_model("convnext_atto", num_classes=10).state_dict(), weights)
    proc = cli("compress", "--teacher", "convnext_atto", "--teacher-weights", weights, "--student", "prune:0.5", "--data", small_data,
               *FAST, "--out", tmp_path / "r")
    assert_user_error(proc, "convnext_atto", "cannot rebuild after pruning", run_dir=tmp_path / "r")


@pytest.mark.parametrize("damage", ["widen", "unknown", "not a number", "wrong type", "no shapes"])
def test_a_damaged_shape_description_is_one_line(damage, pruned_run, small_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pruned_run, run)
    meta = json.loads((run / "student.json").read_text())
    shapes = meta["arch"]["kwargs"]["shapes"]
    if damage == "widen":
        shapes["layer1.0.conv1"]["out_channels"] = 4096
    elif damage == "unknown":
        shapes["layer9.conv"] = {"type": "Conv2d", "out_channels": 8}
    elif damage == "not a number":
        shapes["layer1.0.conv1"]["out_channels"] = "x"
    elif damage == "wrong type":
        shapes["layer1.0.conv1"]["type"] = "Linear"
    else:
        del meta["arch"]["kwargs"]["shapes"]
    (run / "student.json").write_text(json.dumps(meta))
    assert_user_error(cli("eval", run, "--data", small_data, *EVAL), "shape description", "damaged")


def test_students_lists_the_teacher_s_cuts(teacher_run, small_data):
    shown = json.loads(cli_ok("students", "--data", small_data, "--teacher", teacher_run, "--model", "prune:0.5", "--model", "mobilenetv2_050",
                              "--runtime", "torch", "--repeats", "2", "--json").stdout)
    rows = {r["student"]: r for r in shown["rows"]}
    teacher, cut_row = rows[str(teacher_run)], rows["prune:0.5"]
    assert cut_row["error"] is None and cut_row["flops"] <= 0.5 * teacher["flops"] and cut_row["params"] < teacher["params"]
    assert cut_row["latency_ms"] > 0 and "mobilenetv2_050" in " ".join(rows)


def test_the_cut_knows_which_teacher_channels_it_kept_and_select_connectors_start_as_that_selection():
    teacher, done, task = cut("resnet18", "classification", 32, 0.5)
    bn = done.student.model.layer1[0].bn1
    ids = done.kept["layer1.0.bn1"]
    assert len(ids) == bn.num_features < 64 and ids == sorted(set(ids))
    assert torch.equal(bn.weight, teacher.model.layer1[0].bn1.weight[ids])  # the pruner's slice, read back off the tagged means
    assert torch.equal(bn.running_mean, teacher.model.layer1[0].bn1.running_mean[ids])  # and the real means put back
    recipe = recipes.build([{"method": "london", "student": {"source": "prune", "name": "0.5"}, "data": {"input_size": 32}}])
    from lcdistill import methods

    distiller = methods.build(recipe, task, done.student.model, teacher.model, done.student.data_config, teacher.data_config)
    term = next(t for t in distiller.terms if t.name == "london")
    assert prune.select_connectors(distiller.terms, done.kept) == len(term.connectors) > 0
    student_maps = {}
    hooks = [done.student.model.get_submodule(s.name).register_forward_hook(lambda m, i, o, n=s.name: student_maps.setdefault(n, o))
             for s, _ in term.pairs[:len(term.connectors)]]
    done.student.model.eval()(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    for conn, (s, t) in zip(term.connectors, term.pairs):
        mapped = torch.nn.functional.conv2d(student_maps[s.name], conn[0].weight)  # the connector's conv: channel i lands on kept[i]
        ids = prune.channels_of(done.kept, s.name)
        assert torch.equal(mapped[:, ids], student_maps[s.name]) and mapped.shape[1] == t.channels
        assert not mapped[:, [c for c in range(t.channels) if c not in ids]].any()
