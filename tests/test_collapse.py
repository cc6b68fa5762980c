"""Collapsed predictions: each task's metric says when its predictions collapsed (top-1 at chance, one
class on nearly every labelled pixel, no detection above the score threshold), the validator warns once after two such validations in a row,
and a real run made to collapse (lr 1e-9: the random net predicts one class) prints that line once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rich.console import Console

from conftest import cli_ok
from lcdistill.tasks.classification import TopK
from lcdistill.tasks.detection import MeanAP
from lcdistill.tasks.segmentation import IGNORE, ConfusionMatrix
from lcdistill.training.validator import COLLAPSED_VALIDATIONS, Validator


def scores(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits whose argmax is `classes`, class dimension 1 (also for (N, H, W) maps)."""
    return F.one_hot(classes, num_classes).movedim(-1, 1).float()


# ---- classification: top-1 at chance ----------------------------------------------------------------
def test_top1_at_chance_is_collapsed():
    targets = torch.arange(100) % 10
    one_class = TopK(10)
    one_class.update(scores(torch.zeros(100, dtype=torch.long), 10), targets)
    assert "at chance" in one_class.collapsed() and "10 classes" in one_class.collapsed()
    right = TopK(10)
    right.update(scores(targets, 10), targets)
    assert right.collapsed() is None


def test_top1_above_chance_or_unknown_classes_is_not_judged():
    targets = torch.arange(100) % 2
    half_right = torch.where(torch.arange(100) < 60, targets, 1 - targets)  # 60% on two classes
    binary = TopK(2)
    binary.update(scores(half_right, 2), targets)
    assert binary.collapsed() is None  # 1.5x chance would be 75%: capped at chance + 5 points
    assert TopK(10).collapsed() is None  # nothing measured
    unknown = TopK()
    unknown.update(scores(torch.zeros(10, dtype=torch.long), 10), torch.arange(10))
    assert unknown.collapsed() is None


# ---- segmentation: one class on nearly every labelled pixel -----------------------------------------
def test_one_class_on_every_labelled_pixel_is_collapsed():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, :2, :] = 3  # a quarter of the pixels are class 3
    m = ConfusionMatrix(5)
    m.update(scores(torch.zeros(2, 8, 8, dtype=torch.long), 5), labels)
    assert m.collapsed() == "class 0 predicted on 100.0% of labelled pixels (its labels: 75.0%)"
    right = ConfusionMatrix(5)
    right.update(scores(labels, 5), labels)
    assert right.collapsed() is None


def test_unlabelled_pixels_and_one_class_labels_do_not_count():
    labels = torch.full((1, 8, 8), IGNORE, dtype=torch.long)
    labels[:, :4, :4] = 1
    labels[:, 4:, 4:] = 2
    predicted = torch.ones(1, 8, 8, dtype=torch.long)
    predicted[:, 4:, 4:] = 2  # right on every labelled pixel, class 1 on all the ignored ones
    m = ConfusionMatrix(3)
    m.update(scores(predicted, 3), labels)
    assert m.collapsed() is None
    background = torch.zeros(1, 8, 8, dtype=torch.long)
    only = ConfusionMatrix(3)
    only.update(scores(background, 3), background)  # the labels are one class too: predicting it is right
    assert only.collapsed() is None
    assert ConfusionMatrix(3).collapsed() is None  # nothing measured


def test_no_detection_above_the_threshold_is_collapsed():
    target = {"boxes": torch.tensor([[2.0, 2, 10, 10]]), "labels": torch.tensor([1]), "ignore": torch.tensor([False])}
    nothing = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    empty = MeanAP(3)
    empty.update([nothing, nothing], [target, target])
    assert empty.collapsed() == "no detection above the score threshold on 2 val images"
    one = MeanAP(3)
    wrong = {"boxes": torch.tensor([[20.0, 20, 30, 30]]), "scores": torch.tensor([0.3]), "labels": torch.tensor([2])}
    one.update([nothing, wrong], [target, target])
    assert one.collapsed() is None  # a wrong detection is a poor model, not a collapsed one
    assert MeanAP(3).collapsed() is None  # nothing measured


# ---- the validator: twice in a row, said once -----------------------------------------------------------
class Fixed:
    def __init__(self, what):
        self.what = what

    def collapsed(self):
        return self.what


def validator(console: Console, optimizer: str = "sgd") -> Validator:
    v = Validator.__new__(Validator)  # only the collapse bookkeeping, the optimizer's name and the console are used here
    v.console, v.scored, v.collapses, v.warned, v.optimizer = console, [], 0, False, optimizer
    return v


def test_the_validator_warns_once_after_two_collapsed_validations():
    console = Console(record=True, width=200, no_color=True)
    v = validator(console)
    for what in (None, "top-1 at chance", None, "top-1 at chance", "top-1 at chance", "top-1 at chance", None, "x", "x"):
        val = {"top1": 0.0}
        v.scored.append((val, Fixed(what)))
        v.warn_collapse(val)
    lines = [line for line in console.export_text().splitlines() if line.startswith("warning:")]
    assert len(lines) == 1, lines
    assert f"collapsed at {COLLAPSED_VALIDATIONS} validations in a row (top-1 at chance)" in lines[0]
    assert "--lr" in lines[0] and "schedule.optimizer=adamw" in lines[0] and "--batch-size" in lines[0]


def test_the_advice_does_not_suggest_the_optimizer_already_set():
    console = Console(record=True, width=200, no_color=True)
    v = validator(console, optimizer="adamw")
    for _ in range(2):
        val = {"miou": 0.0}
        v.scored.append((val, Fixed("class 0 predicted on 100.0% of labelled pixels")))
        v.warn_collapse(val)
    line = next(line for line in console.export_text().splitlines() if line.startswith("warning:"))
    assert "--lr" in line and "--batch-size" in line and "adamw" not in line


def test_the_validator_reads_the_students_metric_not_the_emas():
    console = Console(record=True, width=200, no_color=True)
    v = validator(console)
    for _ in range(2):
        student, ema = {"top1": 10.0}, {"top1": 10.0}
        v.scored += [(student, Fixed(None)), (ema, Fixed("top-1 at chance"))]
        v.warn_collapse(student)
    assert "warning" not in console.export_text()


# ---- a real run ----------------------------------------------------------------------------------------
def test_a_run_that_collapses_says_so_once(small_data, tmp_path):
    result = cli_ok("train", "--model", "mobilenetv2_050", "--data", small_data, "--epochs", "3", "--lr", "1e-9",
                    "--input-size", "32", "--batch-size", "16", "--workers", "0", "--device", "cpu",
                    "--set", "data.crop_pct=1.0", "--out", tmp_path / "run")
    lines = result.stdout.splitlines()
    warned = [i for i, line in enumerate(lines) if line.startswith("warning: the predictions collapsed")]
    assert len(warned) == 1, result.stdout
    assert "top-1" in lines[warned[0]] and "at chance" in lines[warned[0]] and "--lr" in lines[warned[0]]
    epoch_lines = [i for i, line in enumerate(lines) if line.startswith("epoch 2/3")]
    assert epoch_lines and epoch_lines[-1] < warned[0], "said after the second validation, not before"
