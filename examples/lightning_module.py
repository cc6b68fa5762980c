"""The same kd+london distiller inside a PyTorch Lightning module (pip install 'lcdistill[lightning]').

Lightning runs the loop, moves the module to the device and checkpoints it; lcdistill.Distiller gives the losses.
The teacher travels with the distiller (.to, eval mode) but is no parameter of it, so Lightning's optimizer and
checkpoints hold the student and the connectors only. The student it ships is an lcdistill weights file:

    python examples/lightning_module.py --data data/digits --teacher runs/teacher --out runs/lightning/student.safetensors
    lcdistill export runs/lightning/student.safetensors --format onnx --data data/digits
"""

from __future__ import annotations

import lightning as L
import torch

import lcdistill
from plain_loop import arguments, loaders, make_student, warmup_cosine


class DistillationModule(L.LightningModule):
    def __init__(self, distiller: lcdistill.Distiller, lr: float, warmup_epochs: int):
        super().__init__()
        self.distiller, self.lr, self.warmup_epochs = distiller, lr, warmup_epochs

    def training_step(self, batch, batch_idx):
        # how far training is, for the Lipschitz term's warm-up (london.warmup_epochs)
        epoch = self.current_epoch + batch_idx / self.trainer.num_training_batches
        _, losses = self.distiller(batch, epoch=epoch)
        self.log_dict({f"train/{name}": value for name, value in losses.items()}, prog_bar=True)
        return sum(losses.values())

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        scores, _ = self.distiller(images)
        self.log("val/top1", 100.0 * (scores.argmax(1) == targets).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.distiller.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=4e-5)
        steps = int(self.trainer.estimated_stepping_batches)
        warmup = self.warmup_epochs * steps // max(1, self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup_cosine(optimizer, max(1, warmup), steps), "interval": "step"}}


def main(argv: list[str] | None = None):
    args = arguments(__doc__.splitlines()[0]).parse_args(argv)

    train_loader, val_loader, classes = loaders(args.data, args.input_size, args.batch_size, args.seed)
    L.seed_everything(args.seed, verbose=False)
    student = make_student(len(classes), args.seed)
    distiller = lcdistill.Distiller(student, args.teacher, args.method, input_size=args.input_size, loss={"label_smoothing": 0.1})
    module = DistillationModule(distiller, args.lr, args.warmup_epochs)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(module, train_loader, val_loader)
    print(f"student val top-1 {trainer.callback_metrics['val/top1']:.2f}%")
    if args.out:
        print(f"student: {distiller.save(args.out, classes)}")
    return trainer


if __name__ == "__main__":
    main()
