"""Distil a resnet18 teacher into a mobilenetv2_050 student with kd+london in a plain PyTorch loop.

lcdistill.Distiller gives the student's prediction and the method's named losses (ce, kd, lip); the data, the
optimizer, the schedule and the loop are yours. The settings are `make demo`'s student (lcdistill compress
--method london: ce + kd + the Lipschitz term), so the two can be compared:

    lcdistill data digits data/digits
    lcdistill train --model resnet18 --data data/digits --epochs 10 --lr 0.1 --input-size 32 --batch-size 64 \\
        --set data.hflip=0 --set "data.scale=[0.6,1.0]" --set data.crop_pct=1.0 --set schedule.warmup_epochs=2 --out runs/teacher
    python examples/plain_loop.py --data data/digits --teacher runs/teacher --out runs/loop/student.safetensors
    lcdistill export runs/loop/student.safetensors --format onnx --data data/digits
"""

from __future__ import annotations

import argparse
import math

import timm
import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import lcdistill


def loaders(data: str, input_size: int, batch_size: int, seed: int):
    """(train loader, val loader, class names): torchvision ImageFolders of [0, 1] images (no Normalize: the
    distiller normalises for each model with its own mean and std)."""
    train_tf = transforms.Compose([transforms.RandomResizedCrop(input_size, scale=(0.6, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
                                   transforms.ToTensor()])
    val_tf = transforms.Compose([transforms.Resize(input_size), transforms.CenterCrop(input_size), transforms.ToTensor()])
    train, val = datasets.ImageFolder(f"{data}/train", train_tf), datasets.ImageFolder(f"{data}/val", val_tf)
    order = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size, shuffle=True, drop_last=True, generator=order), DataLoader(val, 256), train.classes)


def make_student(num_classes: int, seed: int) -> torch.nn.Module:
    """A fresh mobilenetv2_050 whose classifier starts small, as lcdistill starts a new head (timm's init gives
    logits of std ~10 with 10 classes, and the first epoch goes on recovering from it)."""
    torch.manual_seed(seed)
    student = timm.create_model("mobilenetv2_050", num_classes=num_classes)
    torch.nn.init.normal_(student.get_classifier().weight, std=0.01)
    torch.nn.init.zeros_(student.get_classifier().bias)
    return student


def fit(distiller: lcdistill.Distiller, loader, optimizer, scheduler, epochs: int) -> None:
    """The loop: one optimizer step per batch on the sum of the distiller's named losses."""
    for epoch in range(epochs):
        distiller.train()  # the student trains; the teacher stays in eval mode
        totals: dict[str, float] = {}
        for batch in loader:  # (images, targets)
            _, losses = distiller(batch)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.item() / len(loader)
        print(f"epoch {epoch + 1}/{epochs}: " + "  ".join(f"{name} {value:.4f}" for name, value in totals.items()))


@torch.no_grad()
def top1(distiller: lcdistill.Distiller, loader) -> float:
    """Val top-1 of the student, in percent."""
    distiller.eval()
    correct = seen = 0
    for batch in loader:
        images, targets = batch[0], batch[1]
        scores, _ = distiller(images)  # images alone: the prediction, no losses
        correct += int((scores.argmax(1) == targets).sum())
        seen += len(targets)
    return 100.0 * correct / seen


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up, then cosine decay to 0, stepped once per batch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / warmup_steps if step < warmup_steps
                                             else 0.5 * (1 + math.cos(math.pi * step / total_steps)))


def arguments(description: str) -> argparse.ArgumentParser:
    """The examples' options: `make demo`'s student settings by default."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", required=True, help="train/ and val/ class folders (lcdistill data digits DIR)")
    parser.add_argument("--teacher", required=True, help="a teacher run folder (lcdistill train), or a model name")
    parser.add_argument("--out", default=None, help="write the student here (.safetensors) for lcdistill export / evaluate / load")
    parser.add_argument("--method", default="kd+london")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> float:
    args = arguments(__doc__.splitlines()[0]).parse_args(argv)
    train_loader, val_loader, classes = loaders(args.data, args.input_size, args.batch_size, args.seed)
    student = make_student(len(classes), args.seed)
    distiller = lcdistill.Distiller(student, args.teacher, args.method, input_size=args.input_size, steps_per_epoch=len(train_loader),
                                    loss={"label_smoothing": 0.1})
    print("\n".join(distiller.describe()))
    # distiller.parameters(): the student's and the Lipschitz term's connectors (the teacher is not among them)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=4e-5)
    steps = args.epochs * len(train_loader)
    fit(distiller, train_loader, optimizer, warmup_cosine(optimizer, args.warmup_epochs * len(train_loader), steps), args.epochs)
    accuracy = top1(distiller, val_loader)
    print(f"student val top-1 {accuracy:.2f}%")
    if args.out:
        print(f"student: {distiller.save(args.out, classes)}")
    return accuracy


if __name__ == "__main__":
    main()
