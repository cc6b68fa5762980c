"""`lcdistill data NAME OUT`: write a bundled example data set as train/ and val/ ImageFolders.

A new data set is one more function below: the writer's counts go through `wrote`.
"""

from __future__ import annotations

import typer

from lcdistill.cli.common import user_errors

app = typer.Typer(help="Write bundled example data sets.", no_args_is_help=True)

OutArg = typer.Argument(..., help="Folder to create with train/ and val/.")


def wrote(out: str, n_train: int, n_val: int, classes: int) -> None:
    typer.echo(f"wrote {n_train} train and {n_val} val images of {classes} classes to {out}")


@app.command("digits")
@user_errors
def digits(out: str = OutArg):
    """scikit-learn's 1,797 handwritten digits as 32x32 RGB PNG ImageFolders (seeded 80/20 split)."""
    from lcdistill.data import write_digits

    wrote(out, *write_digits(out), classes=10)


@app.command("digit-scenes")
@user_errors
def digit_scenes(
    out: str = typer.Argument(..., help="Folder to create, in the PASCAL VOC 2012 layout."),
    size: int = typer.Option(64, "--size", help="Side of each scene in pixels."),
    images: int = typer.Option(1500, "--images", help="Scenes to write (train and val together)."),
    seed: int = typer.Option(0, "--seed"),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share of the scenes that go to val."),
):
    """A segmentation set: 1-4 handwritten digits per scene on noisy backgrounds, masks of classes background, 0-9 (VOC layout)."""
    from lcdistill.data.scenes import CLASSES, write_digit_scenes

    wrote(out, *write_digit_scenes(out, size=size, images=images, seed=seed, val_fraction=val_fraction), classes=len(CLASSES))


@app.command("digit-crops")
@user_errors
def digit_crops(
    out: str = OutArg,
    size: int = typer.Option(32, "--size", help="Side of each image in pixels (at least 16)."),
    train: int = typer.Option(10000, "--train", help="Train images to write (at least 10)."),
    val: int = typer.Option(2000, "--val", help="Val images to write (at least 10)."),
    seed: int = typer.Option(0, "--seed"),
    plain: bool = typer.Option(False, "--plain", help="Each digit white on black, filling the image (as `data digits`), from the same source halves: a pretraining stage that never sees a val digit of the crops or the scenes."),
):
    """Harder digits: each scaled and placed at random on a noisy background, train and val from disjoint source digits (ImageFolders)."""
    from lcdistill.data.crops import CLASSES, write_digit_crops

    wrote(out, *write_digit_crops(out, size=size, train=train, val=val, seed=seed, plain=plain), classes=len(CLASSES))
