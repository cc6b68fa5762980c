"""A student as a Hugging Face Hub model folder, and `lcdistill push` to upload one.

    FOLDER/config.json          timm's own config (architecture, num_classes, label_names, pretrained_cfg
                                with mean, std, input_size, crop_pct, interpolation), written by
                                timm.models.save_for_hf; torchvision and other students get the same
                                keys by hand, with how to build them
    FOLDER/model.safetensors    the student's state dict (timm writes it for timm students)
    FOLDER/README.md            the model card: task, teacher, method, data, eval table, recipe, how to load
    FOLDER/lcdistill.json       the run's student.json: how lcdistill rebuilds and feeds the student

timm students load with `timm.create_model("local-dir:FOLDER", pretrained=True)` (or `hf-hub:ORG/NAME`
once pushed). The folder is built in a temporary folder beside it and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
from pathlib import Path

from torch import nn

from lcdistill import models, tasks
from lcdistill.checkpoint import save_weights
from lcdistill import __version__
from lcdistill.errors import UserError
from lcdistill.measure import flops as count_flops
from lcdistill.models.classifiers import REPO_PLACEHOLDER
from lcdistill.models.hub import _reachable
from lcdistill.runfolder import RunFolder

CONFIG, WEIGHTS, CARD, META = "config.json", "model.safetensors", "README.md", "lcdistill.json"
FILES = (CONFIG, WEIGHTS, CARD, META)


def kind(meta: dict) -> str:
    """How a student loads outside lcdistill, as its family says: 'timm' (timm.create_model), 'tv' (torchvision), 'lcdistill'."""
    return models.family_of(meta["arch"]).hub_kind(meta["arch"])


def data_config(meta: dict) -> dict:
    return {"mean": tuple(meta["mean"]), "std": tuple(meta["std"]), "input_size": tuple(meta["input_size"]),
            "crop_pct": float(meta.get("crop_pct", 0.875)), "interpolation": meta.get("interpolation", "bilinear")}


def hand_config(meta: dict) -> dict:
    """config.json for a student timm cannot build: the same keys timm writes, plus how to build it."""
    arch = meta["arch"]
    cfg = {
        "architecture": arch["name"],
        "library_name": models.family_of(arch).library(arch),
        "task": tasks.of_meta(meta).name,
        "num_classes": meta["num_classes"],
        "label_names": meta["classes"],
        "model_args": {**(arch.get("kwargs") or {}), "num_classes": meta["num_classes"]},
        "lcdistill_arch": arch,
        "pretrained_cfg": {**{k: list(v) if isinstance(v, tuple) else v for k, v in data_config(meta).items()},
                           "num_classes": meta["num_classes"], "tag": "lcdistill"},
    }
    return cfg


# ---- writing the folder --------------------------------------------------------------------
def write(model: nn.Module, meta: dict, out: Path, card: str) -> Path:
    """The hub folder at `out` for a built student (its final weights) and its student.json `meta`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(p.name not in FILES for p in out.iterdir())):
        raise UserError(f"{out} exists and is not a hub folder written by lcdistill", "choose another --out, or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the folder is for sharing
    try:
        _fill(model.eval(), meta, tmp, card)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _fill(model: nn.Module, meta: dict, folder: Path, card: str) -> None:
    how = kind(meta)
    if how == "timm":
        from timm.models import save_for_hf

        # timm writes config.json (pretrained_cfg with our preprocessing, label names) and the weights
        save_for_hf(model, str(folder), model_config={"label_names": list(meta["classes"]), "pretrained_cfg": {"tag": "lcdistill", "license": "other"}},
                    safe_serialization=True, data_config=data_config(meta))
    else:
        # the lcdistill header lets `lcdistill.models.load_run(FOLDER/model.safetensors)` rebuild it
        save_weights(folder / WEIGHTS, model.state_dict(), {"lcdistill": meta} if how == "lcdistill" else None)
        (folder / CONFIG).write_text(json.dumps(hand_config(meta), indent=2) + "\n")
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")
    (folder / CARD).write_text(card, encoding="utf-8")
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)  # some writers make private files; the folder is for sharing
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an older one goes only once the new one is there."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load(folder: Path) -> nn.Module:
    """The student built from a hub folder the way its card says (timm, torchvision or lcdistill), in eval mode."""
    folder = Path(folder)
    meta = json.loads((folder / META).read_text())
    how = kind(meta)
    if how == "timm":
        import timm

        model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True)
    elif how == "tv":
        import torchvision
        from safetensors.torch import load_file

        cfg = json.loads((folder / CONFIG).read_text())
        model = torchvision.models.get_model(cfg["architecture"], **cfg["model_args"])
        model.load_state_dict(load_file(str(folder / WEIGHTS)))
    else:
        model = tasks.of_meta(meta).exportable(models.load_run(folder / WEIGHTS).model)
    return model.eval()


# ---- the model card --------------------------------------------------------------------------
def _fmt(value, spec: str = "{:.2f}") -> str:
    return spec.format(value) if value is not None else "-"


def eval_table(results: dict, columns) -> str:
    """A markdown table of an `lcdistill eval --save` file (student, teacher, exported files)."""
    head = ["", "runs on", *(h for h, _ in columns), "params", "GFLOPs", "file MB", "ms @1", "batch", "ms @batch"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for role, r in results.items():
        runs_on = {"onnx": "onnxruntime"}.get(r.get("kind"), r.get("kind", "-"))
        where = f"{runs_on} {r.get('device', '')}" + (f" x{r['threads']}" if r.get("threads") else "")
        cells = [role, where.strip(), *(_fmt(r.get(key)) for _, key in columns),
                 _fmt(r.get("params") and r["params"] / 1e6, "{:.2f}M"), _fmt(r.get("flops") and r["flops"] / 1e9, "{:.3f}"),
                 _fmt(r.get("file_bytes") and r["file_bytes"] / 1e6), _fmt(r.get("latency_ms_b1")), str(r.get("batch_size", "-")),
                 _fmt(r.get("latency_ms_batch"))]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def meta_table(meta: dict, columns, flops: int | None) -> str:
    """The teacher/student table from student.json alone (no eval.json)."""
    head = ["", "model", *(h for h, _ in columns), "params", "GFLOPs"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    teacher = meta.get("teacher")
    if teacher:
        rows.append("| " + " | ".join(["teacher", teacher.get("origin", "-"), *(_fmt(teacher.get(k)) for _, k in columns),
                                       _fmt(teacher.get("params") and teacher["params"] / 1e6, "{:.2f}M"), "-"]) + " |")
    arch = meta["arch"]
    rows.append("| " + " | ".join(["student", f"{arch['source']}:{arch['name']}", *(_fmt(meta.get(k)) for _, k in columns),
                                   _fmt(meta.get("params") and meta["params"] / 1e6, "{:.2f}M"), _fmt(flops and flops / 1e9, "{:.3f}")]) + " |")
    return "\n".join(rows)


def usage(meta: dict) -> str:
    """How to load the student, in code a user can paste: its library's own way (the family's), and
    lcdistill's where the library alone does not rebuild the shipped module."""
    arch, task = meta["arch"], tasks.of_meta(meta).name
    plain = models.family_of(arch).plain_usage(meta)
    if kind(meta) != "lcdistill":
        return plain
    return plain + textwrap.dedent(f"""\
        A {task} student. Its architecture is lcdistill's spec (config.json `lcdistill_arch`):

        ```json
        {json.dumps(arch)}
        ```

        lcdistill rebuilds it from model.safetensors, whose header carries that spec, the classes and the preprocessing:

        ```python
        # pip install lcdistill
        from huggingface_hub import snapshot_download
        from lcdistill import models, tasks

        folder = snapshot_download("{REPO_PLACEHOLDER}")  # or the path of this folder on disk
        loaded = models.load_run(f"{{folder}}/model.safetensors")   # loaded.model, loaded.classes, loaded.data_config
        model = tasks.get("{task}").exportable(loaded.model).eval()   # input: normalised [N, 3, H, W]
        ```
        """)


def card(meta: dict, task, run: dict, recipe_text: str | None, results: dict | None, flops: int | None) -> str:
    """README.md for the folder, in timm's model-card layout (timm.models.generate_readme)."""
    from timm.models._hub import generate_readme

    arch, columns = meta["arch"], task.metric(meta["num_classes"]).columns
    teacher = (meta.get("teacher") or {}).get("origin")
    dataset = run.get("dataset") or "the training data"
    sizes = run.get("sizes")
    task_name = task.hub_pipeline or task.name
    size = meta["input_size"]
    details = {
        "Model Type": f"{task.name} ({meta['num_classes']} classes)",
        "Architecture": f"{arch['source']}:{arch['name']}" + (f" {arch['kwargs']}" if arch.get("kwargs") else ""),
        "Params (M)": _fmt(meta.get("params") and meta["params"] / 1e6),
        "GFLOPs": f"{_fmt(flops and flops / 1e9, '{:.3f}')} at {size[-2]}x{size[-1]}",
        "Image size": f"{size[-2]} x {size[-1]}",
        "Teacher": teacher or "none (trained without a teacher)",
        "Method": meta.get("method", "-"),
        "Dataset": dataset,
        "Dataset size": sizes or "-",
        "Epochs": meta.get("epochs", "-"),
        "Classes": ", ".join(map(str, meta["classes"][:20])) + (f", ... ({len(meta['classes'])} in all)" if len(meta["classes"]) > 20 else ""),
        "Trained with": f"lcdistill {meta.get('lcdistill_version') or __version__}",
    }
    values = "  ".join(f"{h} {meta[k]:.2f}" for h, k in columns if meta.get(k) is not None)
    description = (f"A {arch['name']} student for {task.name} of {dataset}, distilled"
                   + (f" from {teacher}" if teacher else "") + f" with lcdistill (method `{meta.get('method', '-')}`"
                   + (", LONDON: Lipschitz-continuity-guided knowledge distillation, Shang et al., ICCV 2021" if "london" in str(meta.get("method")) else "")
                   + f"). Validation: {values or '-'}.")
    if results:
        comparison = ("Measured by `lcdistill eval` on the validation images (latency: median of 10 calls after 3 warm-up calls, "
                      "random input):\n\n" + eval_table(results, columns) + "\n")
    else:
        comparison = "From the run's own validation (run `lcdistill eval RUN --data DIR --save RUN/eval.json` for latency):\n\n" \
                     + meta_table(meta, columns, flops) + "\n"
    if recipe_text:
        comparison += "\n### Recipe\n\nThe run's resolved recipe (`lcdistill compress --recipe recipe.yaml` repeats it):\n\n```yaml\n" \
                      + recipe_text.rstrip() + "\n```\n"
    model_card = {
        "tags": [task_name, models.family_of(arch).library(arch), "lcdistill", "knowledge-distillation"],
        "library_name": models.family_of(arch).library(arch),
        "license": "other",
        "license_name": "set-by-the-data-owner",
        "description": description + "\n\nThe license is the training data owner's call: edit `license` above before sharing.",
        "details": details,
        "usage": usage(meta),
        "comparison": comparison,
    }
    return generate_readme(model_card, f"{arch['name']} student ({dataset})", task_name=task_name)


# ---- from a run ------------------------------------------------------------------------------
def run_facts(folder: Path | None, meta: dict, task) -> dict:
    """Dataset name and sizes from the run's run.json (data may have moved: then its name alone)."""
    if folder is None or not RunFolder(folder).inputs.is_file():
        return {}
    data = json.loads(RunFolder(folder).inputs.read_text()).get("data")
    if not data:
        return {}
    facts = {"dataset": Path(data).name}
    if Path(data).is_dir():
        try:
            splits = task.scan(data, check=False)
            facts["sizes"] = f"{len(splits.train.samples):,} train / {len(splits.val.samples):,} val images, {len(splits.classes)} classes"
        except (UserError, AttributeError):
            pass
    return facts


def from_artifact(source, out: Path, eval_file: Path | None = None) -> Path:
    """Write the hub folder for an artifacts.Artifact of kind run or weights."""
    loaded, task = source.loaded, source.task
    meta = dict(loaded.meta)
    folder = RunFolder(source.folder)
    eval_path = Path(eval_file) if eval_file else folder.eval
    results = None
    if eval_path.is_file():
        try:
            results = json.loads(eval_path.read_text())
        except ValueError:
            raise UserError(f"{eval_path} is not an `lcdistill eval --save` file", "write it again with `lcdistill eval RUN --data DIR --save FILE`") from None
    elif eval_file:
        raise UserError(f"--eval {eval_file} not found", "write it with `lcdistill eval RUN --data DIR --save FILE`")
    recipe_text = folder.recipe.read_text() if folder.recipe.is_file() else None
    model = loaded.model.eval()
    try:
        n_flops = count_flops(task.exportable(model), task.export.example(meta, 1))
    except Exception:  # FLOPs are for the card only
        n_flops = None
    text = card(meta, task, run_facts(source.folder, meta, task), recipe_text, results, n_flops)
    return write(model, meta, out, text)


# ---- push ------------------------------------------------------------------------------------
def is_hub_folder(path: Path) -> bool:
    return Path(path).is_dir() and all((Path(path) / name).is_file() for name in (CONFIG, WEIGHTS, CARD))


def preflight(repo: str, token: str | None = None) -> str:
    """Check the repo id, find a token and probe the Hub, before anything is written or sent; returns the token."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
        ok = repo.count("/") == 1
    except HFValidationError:
        ok = False
    if not ok:
        raise UserError(f"--repo '{repo}' is not a Hub repo id", "pass --repo ORG/NAME (your user or organisation, then the model name)")
    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face token found, nothing was uploaded",
                        "run `huggingface-cli login` or set HF_TOKEN to a token with write access, then push again")
    if not _reachable("huggingface.co"):
        raise UserError("the Hugging Face Hub is unreachable (offline, or HF_HUB_OFFLINE / LCDISTILL_OFFLINE set), nothing was uploaded",
                        "connect to the network and run `lcdistill push` again")
    return token


def upload(folder: Path, repo: str, private: bool, token: str) -> str:
    """Upload a hub folder to repo in one commit (all files or none, the card naming the repo); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token, library_name="lcdistill")
    with tempfile.TemporaryDirectory(prefix=".lcdistill-push-") as tmp:
        staged = Path(tmp) / "folder"
        shutil.copytree(folder, staged)
        readme = staged / CARD
        readme.write_text(readme.read_text(encoding="utf-8").replace(REPO_PLACEHOLDER, repo), encoding="utf-8")
        try:
            api.create_repo(repo, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo, folder_path=str(staged), commit_message="Add lcdistill student")
        except Exception as e:  # HTTP errors (401, 403, 404), network drops: the commit was not made
            detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise UserError(f"push to {repo} failed ({detail}), no commit was made",
                            "check the token's write access and the repo name, then push again") from None
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}"


__all__ = ["FILES", "card", "from_artifact", "is_hub_folder", "load", "preflight", "upload", "write"]
