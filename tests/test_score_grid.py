"""The coarse-grid check: where a segmentation model scores its classes, and the best mIoU a grid that
coarse can reach on the masks (lcdistill.tasks.score_grid)."""

from __future__ import annotations

import torch

from lcdistill import tasks
from lcdistill.tasks.score_grid import CEILING, coarse_grid, grid_ceiling, score_grid


def strokes(n: int = 8, size: int = 64) -> torch.Tensor:
    """Masks of thin (2 px) strokes of classes 1-3 on background 0, a few pixels ignored (255)."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for c in (1, 2, 3):
            r, col = (int(v) for v in torch.randint(4, size - 20, (2,), generator=g))
            masks[i, r:r + 16, col:col + 2] = c
            masks[i, r:r + 2, col:col + 12] = c
    masks[:, 0, :4] = 255
    return masks


def test_ceiling_is_perfect_at_full_resolution_and_background_at_one_cell():
    masks = strokes()
    assert grid_ceiling(masks, (64, 64), 4) == 100.0
    # one cell: background everywhere; IoU 0 for the three stroke classes, background's IoU its pixel share
    background = ((masks == 0).sum() / (masks != 255).sum()).item()
    assert abs(grid_ceiling(masks, (1, 1), 4) - 100 * background / 4) < 1e-6


def test_ceiling_grows_with_the_grid():
    masks = strokes()
    ceilings = [grid_ceiling(masks, (k, k), 4) for k in (4, 8, 16, 32)]
    assert ceilings == sorted(ceilings) and ceilings[0] < CEILING < ceilings[-1]


def test_the_line_names_the_grid_and_a_size_that_lifts_it():
    masks = strokes()
    line = coarse_grid("tv:deeplabv3_mobilenet_v3_large", (4, 4), 64, masks, 4)
    assert line.startswith("tv:deeplabv3_mobilenet_v3_large scores the classes on a 4x4 grid at 64 px (1/16 of the input)")
    assert "--input-size 256" in line or "--input-size 128" in line
    assert coarse_grid("smp:FPN:resnet18", (32, 32), 64, masks, 4) is None


def test_score_grid_finds_where_each_model_scores():
    task = tasks.get("segmentation")
    torch.manual_seed(0)
    for name, grid in (("tv:deeplabv3_mobilenet_v3_large", (4, 4)), ("tv:lraspp_mobilenet_v3_large", (8, 8)), ("smp:FPN:resnet18", (16, 16))):
        model = task.resolve(name, 5, pretrained=False, keep_head=False).model
        assert score_grid(task.exportable(model), 64, 5) == grid, name
