"""`lcdistill.Distiller`: LONDON (or any method `lcdistill compress` takes) in your own training loop.

    distiller = lcdistill.Distiller(student, "runs/teacher", "kd+london", input_size=32, steps_per_epoch=len(loader))
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.02, momentum=0.9)   # the student and the connectors
    for images, targets in loader:                   # images in [0, 1]: the distiller normalises for each model
        prediction, losses = distiller((images, targets))   # {"ce": .., "kd": .., "lip": ..}
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

The method is built exactly as the CLI builds it (the recipe's defaults, the task's, the settings given, the
same validation), by methods.build_terms, into the Distiller the CLI trains (methods.base.Distiller): this
class only resolves what a Python caller hands it, turns a loader's batch into the task's Batch and counts
steps for the terms that ramp in over epochs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lcdistill import methods, models, recipe as recipes, tasks
from lcdistill.checkpoint import save_weights
from lcdistill.errors import UserError
from lcdistill.inference import Model
from lcdistill.models.registry import build as build_arch
from lcdistill.tasks import Batch

IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def num_classes_of(model: nn.Module) -> int | None:
    """A classifier's class count: timm's num_classes, else the out_features of its last Linear (None when unknown)."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linear[-1].out_features if linear else None


class Distiller(methods.Distiller):
    """A student trained by a teacher with a method's named losses; the teacher is held, not registered.

    student: an nn.Module, or a name the task's families build (a recipe's student name: "mobilenetv2_050",
        "smp:FPN:resnet18", "det:FCOS:mobilenet_v3_small"), built with a fresh head of num_classes.
    teacher: an nn.Module, an lcdistill.load() model, or what --teacher takes: a run folder, a weights file, or a
        hub name (+ teacher_weights). None only for method "ce".
    method: "london" (ce + kd + the Lipschitz term), "kd", "ce", or terms joined by '+' ("kd+london", "ofd+london",
        "cwd"); None: the task's default. Each term's settings are a keyword named after its section:
        kd={"temperature": 2}, london={"alpha": 0.5, "warmup_epochs": 0}; loss={"ce": 1.0, "label_smoothing": 0.1}.
    task: "classification" (the default), "segmentation" or "detection": what a batch holds and what the losses are.
    input_size: the square side trained at (the Lipschitz term leaves out maps of too few positions; a detector
        resizes to it); default the teacher run's, else the student's own config.
    mean, std: the student's normalisation (default its timm config, ImageNet's otherwise); the teacher's comes from
        its run or its config. normalize=False: the loader's images are already normalised, and fed as they are.
    steps_per_epoch: len(train loader), so the terms that ramp in over epochs (london.warmup_epochs, dkd's) know
        how far training is from the steps counted; or pass epoch= (fractional) to each call.
    seed: torch.manual_seed(seed) just before a student given by name is built (as `compress --seed` does).

    parameters() is what trains (the student, then the terms' connectors: extra_parameters()); state_dict() holds
    no teacher tensor; train() keeps the teacher in eval mode; .to() moves it along.
    """

    def __init__(self, student: nn.Module | str, teacher: nn.Module | str | None = None, method: str | None = None,
                 task: str | None = None, *, input_size: int | None = None, num_classes: int | None = None,
                 teacher_weights: str | None = None, mean=None, std=None, normalize: bool = True, steps_per_epoch: int | None = None,
                 seed: int | None = None, loss: dict | None = None, **settings: dict):
        if task == "auto" or not isinstance(task, (str, type(None))):
            raise UserError(f"task={task!r}: the Distiller has no data folder to read the task from", f"pass task= one of {', '.join(tasks.TASKS)}")
        the_task = tasks.get(task or tasks.LEGACY)
        sections = sorted(methods.sections())
        stray = [k for k in settings if k not in sections]
        if stray:
            raise UserError(f"Distiller takes each method term's settings by its section name ({', '.join(sections)}) and loss=, not {stray[0]}=",
                            "pass e.g. london={'alpha': 0.5}; training options (epochs, lr, ...) belong to your loop")
        named = student if isinstance(student, str) else type(student).__name__  # the recipe names a student; only a name builds one
        layer = {"task": the_task.name, "student": {"name": named}, "data": {"input_size": input_size}, "loss": dict(loss or {}), **settings}
        if method is not None:
            layer["method"] = method
        recipe = recipes.build([layer], the_task.recipe_defaults)
        t_module, t_cfg, t_meta, t_loaded = self._teacher(teacher, the_task, recipe["method"], num_classes, teacher_weights, student)
        n = num_classes or len(t_meta.get("classes") or []) or None
        s_loaded = self._student(student, the_task, n, seed)
        s_module, s_cfg = (student, models.data_config(student)) if s_loaded is None else (s_loaded.model, s_loaded.data_config)
        given = input_size is not None
        if not given:
            input_size = int((t_meta.get("input_size") or s_cfg["input_size"])[-1])
            recipe["data"]["input_size"] = input_size
        # a detector resizes to the input size inside: those built here, and modules handed over with input_size given
        for loaded, module, cfg in ((s_loaded, s_module, s_cfg), (t_loaded, t_module, t_cfg)):
            if loaded is not None or (given and module is not None):
                the_task.configure(loaded or models.Loaded(module, {}, 0, dict(cfg), "", {}), input_size)
        if t_meta.get("crop_pct") is not None:  # a teacher run's eval crop, as compress takes it
            s_cfg = {**s_cfg, "crop_pct": float(t_meta["crop_pct"])}
        if mean is not None or std is not None:
            s_cfg = {**s_cfg, "mean": list(mean if mean is not None else s_cfg["mean"]), "std": list(std if std is not None else s_cfg["std"])}
        terms = methods.build_terms(recipe, the_task, s_module, t_module)
        super().__init__(s_module, t_module, the_task, terms, recipe["loss"], s_cfg, t_cfg)
        if not normalize:
            self.student_stats = IDENTITY
            self.teacher_stats = IDENTITY if t_module is not None else None
        self.recipe, self.input_size, self.steps_per_epoch, self.steps = recipe, input_size, steps_per_epoch, 0
        self.classes: list[str] | None = t_meta.get("classes")
        self._arch, self._student_cfg = s_loaded.arch if s_loaded is not None else None, s_cfg

    # ---- what a caller hands over -------------------------------------------------------------------
    @staticmethod
    def _teacher(teacher, task, method: str, num_classes: int | None, weights: str | None, student) -> tuple:
        """(module, data config, run metadata, models.Loaded when resolved here) of the teacher given."""
        if teacher is None:
            if methods.needs_teacher(method):
                raise UserError(f"method '{method}' needs a teacher", "pass teacher= a model, a run folder or a hub name, or use method='ce'")
            return None, None, {}, None
        if isinstance(teacher, Model):  # lcdistill.load(...): its PyTorch model and what it was trained with
            if teacher.model is None or teacher.kind not in ("run", "weights"):
                raise UserError(f"the teacher {teacher.file} is an exported file", "pass the run folder or its student.safetensors")
            return teacher.model, dict(teacher.meta), dict(teacher.meta), None
        if isinstance(teacher, nn.Module):
            return teacher, models.data_config(teacher), {}, None
        if not isinstance(teacher, (str, Path)):
            raise UserError(f"teacher must be an nn.Module, a run folder or a model name, got {type(teacher).__name__}",
                            "pass teacher=model or teacher='runs/teacher'")
        n = num_classes or (num_classes_of(student) if isinstance(student, nn.Module) else None)
        if n is None and not Path(teacher).exists():
            raise UserError(f"the class count for teacher {teacher} is not known", "pass num_classes=N (the data's classes)")
        with torch.random.fork_rng():  # its random initial weights are overwritten: leave the caller's random state alone
            loaded = task.resolve(str(teacher), n or 0, role="teacher", weights=weights, pretrained=True)
        return loaded.model, loaded.data_config, {**(loaded.meta or {}), "classes": loaded.classes}, loaded

    @staticmethod
    def _student(student, task, num_classes: int | None, seed: int | None) -> models.Loaded | None:
        """The student built by name (None: handed over as a module)."""
        if isinstance(student, nn.Module):
            return None
        if not isinstance(student, str):
            raise UserError(f"student must be an nn.Module or a model name, got {type(student).__name__}",
                            "pass student=timm.create_model(...) or student='mobilenetv2_050'")
        if num_classes is None:
            raise UserError(f"the class count for student {student} is not known", "pass num_classes=N, or a teacher run folder")
        if seed is not None:
            torch.manual_seed(seed)
        return task.resolve(student, num_classes, role="student", pretrained=False, keep_head=False)

    def _batch(self, batch) -> Batch:
        images_only = isinstance(batch, (list, tuple)) and batch and all(isinstance(i, torch.Tensor) and i.dim() == 3 for i in batch)
        if isinstance(batch, torch.Tensor) or images_only:  # a batch tensor, or a detector's list of [3, H, W] images
            batch = Batch(batch, None)
        elif isinstance(batch, dict) and "images" in batch:
            batch = Batch(batch["images"], batch.get("targets"))
        elif not isinstance(batch, Batch):
            if not isinstance(batch, (list, tuple)) or len(batch) not in (2, 3):
                raise UserError(f"a batch is (images, targets), got a {type(batch).__name__}" + (f" of {len(batch)}" if hasattr(batch, "__len__") else ""),
                                "pass what your loader yields: (images, targets), images in [0, 1]")
            batch = self.task.batch(tuple(batch))
        images = batch.images
        if isinstance(images, torch.Tensor) and not images.is_floating_point():
            raise UserError(f"images must be float, got {images.dtype}", "scale pixels to [0, 1] (transforms.ToTensor does)")
        device = next(self.student.parameters()).device
        return batch.to(device)

    def _progress(self, epoch: float | None) -> None:
        """Set how far training is (epochs, fractional) before a training step."""
        if epoch is not None:
            self.progress = float(epoch)
        elif self.steps_per_epoch:
            self.progress = self.steps / self.steps_per_epoch
        else:
            ramps = [f"{t.section}.{t.warmup_key}={t.settings[t.warmup_key]}" for t in self.terms if t.warmup_key and t.settings[t.warmup_key]]
            if ramps:
                raise UserError(f"{', '.join(ramps)} ramps its term in over epochs, and the distiller does not know how far training is",
                                "pass steps_per_epoch=len(train_loader) to Distiller, or epoch=epoch + step / steps_per_epoch to each call, "
                                f"or set the warm-up to 0 ({ramps[0].split('.')[0]}={{'{ramps[0].split('.')[1].split('=')[0]}': 0}})")

    # ---- one step -----------------------------------------------------------------------------------
    def forward(self, batch, epoch: float | None = None):
        """(the student's prediction, {loss name: tensor}) for a loader's batch: (images, targets) as the task's
        data gives them (a classifier: [N, 3, H, W] in [0, 1] and [N] labels). The losses include the task's
        supervised loss (weighted by loss.ce) and each term's; images alone give the prediction and no losses.
        epoch: fractional epochs done, for terms that ramp in (default: counted from steps_per_epoch)."""
        batch = self._batch(batch)
        counting = self.training and batch.targets is not None and torch.is_grad_enabled()
        if counting:
            self._progress(epoch)
        out, losses = super().forward(batch)
        if counting:
            self.steps += 1
        return out.prediction, losses

    def extra_parameters(self) -> list[nn.Parameter]:
        """The terms' own trainable parameters (LONDON's and OFD's connectors), for an optimizer built over the
        student alone: optimizer.add_param_group({"params": distiller.extra_parameters()})."""
        return [p for term in self.terms for p in term.parameters() if p.requires_grad]

    # ---- shipping the student -----------------------------------------------------------------------
    def save(self, path: str | Path, classes: list[str] | None = None) -> Path:
        """The student as a .safetensors weights file with lcdistill's metadata inside (architecture, classes,
        mean/std, input size): what lcdistill.export, evaluate and load take, as they take a run's student."""
        classes = list(classes or self.classes or [])
        if not classes:
            raise UserError("the student's class names are not known", "pass classes=[...] (the data's class folders, in order)")
        arch = self._arch or self._timm_arch(len(classes))
        loaded = models.Loaded(self.student, arch, len(classes), self._student_cfg, "", {})
        size = [3, self.input_size, self.input_size]
        meta = models.model_meta(loaded, classes, size, {**self.task.metadata(classes), "method": self.recipe["method"]})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(path, {k: v.detach().cpu() for k, v in self.student.state_dict().items()}, {"lcdistill": meta})
        return path

    def _timm_arch(self, num_classes: int) -> dict:
        """The architecture of a timm student handed over as a module, checked to rebuild with the same tensors."""
        name = (getattr(self.student, "pretrained_cfg", None) or {}).get("architecture")
        if name:
            arch = {"source": "timm", "name": name, "kwargs": {}}
            own = {k: v.shape for k, v in self.student.state_dict().items()}
            with torch.random.fork_rng():  # building draws initial weights: leave the caller's random state alone
                rebuilt = build_arch(arch, num_classes)
            if {k: v.shape for k, v in rebuilt.state_dict().items()} == own:
                return arch
        raise UserError("the student module's architecture cannot be named for lcdistill to rebuild it",
                        "pass the student by name (Distiller('mobilenetv2_050', ...)), or export the module yourself with torch.onnx")
