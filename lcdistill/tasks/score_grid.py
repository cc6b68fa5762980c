"""How fine a grid a segmentation model scores the classes on, and the best mIoU any grid that coarse
can reach on the val masks once upsampled: the check that says "train at a larger input size".

torchvision's DeepLabV3 over MobileNetV3 scores at 1/16 of the input: a 4x4 grid at 64 px. On digit
scenes (thin strokes) the best a 4x4 grid can do, upsampled bilinearly, is 14.8 mIoU, nearly all of it
background, and such a model trained at 64 px predicts background everywhere (8.07 mIoU). At 128 px
the same model's 8x8 grid can reach 53.9; smp's FPN (1/4 of the input, 16x16 at 64 px) 74.2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = 255
# below this best-possible mIoU on the val masks the grid, not the training, bounds the result
CEILING = 60.0
MASKS = 100  # val masks the ceiling is computed on (spread evenly)


@torch.no_grad()
def score_grid(predict: nn.Module, size: int, num_classes: int) -> tuple[int, int] | None:
    """The largest [h, w] at which a convolution of predict (a model's exported forward) outputs
    num_classes channels for one size x size input: where the classes are scored before upsampling
    (DeepLabV3's classifier, LR-ASPP's low-level classifier, smp's segmentation head). None if none does."""
    found: list[tuple[int, int]] = []

    def seen(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            found.append(tuple(output.shape[-2:]))

    device = next((p.device for p in predict.parameters()), torch.device("cpu"))
    was = [(m, m.training) for m in predict.modules()]
    hooks = [m.register_forward_hook(seen) for m in predict.modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]
    try:
        predict.eval()
        predict(torch.zeros(1, 3, size, size, device=device))
    except Exception:  # a model the probe cannot run is the build's business, not this check's
        return None
    finally:
        for h in hooks:
            h.remove()
        for m, mode in was:
            m.training = mode
    return max(found, key=lambda s: s[0] * s[1]) if found else None


def grid_ceiling(masks: torch.Tensor, grid: tuple[int, int], num_classes: int) -> float:
    """The mIoU (%) of the best prediction made on a grid-sized map and upsampled bilinearly to masks
    [N, H, W] (IGNORE left out): each cell holds its pixels' class shares, as a perfectly trained model's
    scores would. IoU over the classes present in the masks or the prediction, as the metric counts it."""
    inter = torch.zeros(num_classes, dtype=torch.float64)
    union = torch.zeros(num_classes, dtype=torch.float64)
    for chunk in masks.split(4):  # one-hot at 512 px and 21 classes: 88 MB a chunk
        valid = chunk != IGNORE
        onehot = F.one_hot(chunk.where(valid, 0), num_classes).permute(0, 3, 1, 2).float() * valid[:, None]
        shares = F.adaptive_avg_pool2d(onehot, grid)
        scores = F.interpolate(torch.log(shares + 1e-4), size=chunk.shape[-2:], mode="bilinear", align_corners=False)
        pred = scores.argmax(1)
        for c in range(num_classes):
            p, t = (pred == c) & valid, chunk == c
            inter[c] += (p & t).sum()
            union[c] += (p | t).sum()
    present = union > 0
    return float(100 * (inter[present] / union[present]).mean()) if present.any() else 0.0


def coarse_grid(name: str, grid: tuple[int, int], size: int, masks: torch.Tensor, num_classes: int) -> str | None:
    """A warning line when the grid caps mIoU under CEILING on these masks (at input size `size`), naming
    the input size that lifts the cap (the grid grows with the input), else None."""
    ceiling = grid_ceiling(masks, grid, num_classes)
    if ceiling >= CEILING:
        return None
    line = (f"{name} scores the classes on a {grid[0]}x{grid[1]} grid at {size} px (1/{size // max(grid)} of the input): upsampled from "
            f"any grid that coarse, the val masks reach at most {ceiling:.1f} mIoU")
    for k in (2, 4):
        bigger = F.interpolate(masks[:, None].float(), scale_factor=k, mode="nearest")[:, 0].long()
        lifted = grid_ceiling(bigger, (grid[0] * k, grid[1] * k), num_classes)
        if lifted >= CEILING or k == 4:
            return line + f": train at --input-size {size * k} (at most {lifted:.1f} there) or use a model that scores finer (smp:FPN:...)"
    return line
