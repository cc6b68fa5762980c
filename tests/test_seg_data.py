"""Segmentation data: the digit-scenes writer (VOC layout), both layouts read and checked, the joint dataset."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcdistill.data.scenes import CLASSES, split_sources, voc_palette, write_digit_scenes
from lcdistill.data.segmentation import (
    VOC_CLASSES, SegmentationDataset, SegSplit, detect_layout, load_mask, scan_segmentation,
)
from lcdistill.errors import UserError

N_IMAGES, N_VAL = 240, 48  # val_fraction 0.2
VALID = set(range(11)) | {255}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "voc"
    assert write_digit_scenes(out, images=N_IMAGES, seed=0) == (N_IMAGES - N_VAL, N_VAL)
    return out


def ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def mask_of(root: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(root / "SegmentationClass" / f"{name}.png"))


def objects(root: Path, name: str) -> list[tuple[int, tuple[int, int, int, int], int]]:
    """(digit, (xmin, ymin, xmax, ymax), source index) per object of an annotation."""
    tree = ET.parse(root / "Annotations" / f"{name}.xml").getroot()
    out = []
    for obj in tree.iter("object"):
        box = tuple(int(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax"))
        out.append((int(obj.find("name").text), box, int(obj.find("source_index").text)))
    return out


def copy_of(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest)
    return dest


def as_folders(voc: Path, out: Path, n: int = 6, mode: str = "P", classes: bool = False) -> Path:
    """The first n train and val scenes in the folders layout (train/images + train/masks)."""
    for split in ("train", "val"):
        (out / split / "images").mkdir(parents=True)
        (out / split / "masks").mkdir(parents=True)
        for name in ids(voc, split)[:n]:
            shutil.copy(voc / "JPEGImages" / f"{name}.jpg", out / split / "images" / f"{name}.jpg")
            mask = Image.open(voc / "SegmentationClass" / f"{name}.png")
            (mask if mode == "P" else Image.fromarray(np.asarray(mask), "L")).save(out / split / "masks" / f"{name}.png")
    if classes:
        shutil.copy(voc / "classes.txt", out / "classes.txt")
    return out


# ---- write_digit_scenes -------------------------------------------------------------------------------
def test_scenes_are_written_in_the_voc_layout(scenes):
    train, val = ids(scenes, "train"), ids(scenes, "val")
    assert len(train) == N_IMAGES - N_VAL and len(val) == N_VAL and not set(train) & set(val)
    assert (scenes / "classes.txt").read_text().split() == ["background"] + [str(d) for d in range(10)] == CLASSES
    for name in train + val:
        for path in (scenes / "JPEGImages" / f"{name}.jpg", scenes / "SegmentationClass" / f"{name}.png", scenes / "Annotations" / f"{name}.xml"):
            assert path.is_file(), path
    assert len(list((scenes / "JPEGImages").iterdir())) == N_IMAGES
    with Image.open(scenes / "JPEGImages" / f"{train[0]}.jpg") as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 64))
    assert not list(scenes.parent.glob(".*")), "the staging folder is left behind"


def test_scene_masks_are_voc_palette_pngs_with_every_class(scenes):
    palette = voc_palette()
    assert palette[255 * 3:] == [224, 224, 192] and palette[3:6] == [128, 0, 0] and palette[:3] == [0, 0, 0]
    seen = {"train": set(), "val": set()}
    for split in seen:
        for name in ids(scenes, split):
            with Image.open(scenes / "SegmentationClass" / f"{name}.png") as im:
                assert im.mode == "P" and im.size == (64, 64)
                assert im.getpalette()[:768] == palette
                values = np.asarray(im)
            assert set(np.unique(values).tolist()) <= VALID, name
            assert (values == 255).any() and (values == 0).mean() > 0.3, name  # borders marked, mostly background
            seen[split] |= set(np.unique(values).tolist())
    assert seen["train"] == seen["val"] == VALID  # every digit class 1..10 appears in both splits


def test_scene_boxes_fit_the_visible_strokes(scenes):
    for name in ids(scenes, "train")[:80] + ids(scenes, "val")[:20]:
        mask, objs = mask_of(scenes, name), objects(scenes, name)
        assert 1 <= len(objs) <= 4
        digits_in_mask = set(np.unique(mask[(mask > 0) & (mask < 255)]).tolist())
        assert {d + 1 for d, _, _ in objs} == digits_in_mask, name
        for digit, (x0, y0, x1, y1), _ in objs:
            assert 1 <= x0 <= x1 <= 64 and 1 <= y0 <= y1 <= 64, (name, x0, y0, x1, y1)
            inside = mask[y0 - 1:y1, x0 - 1:x1] == digit + 1  # VOC boxes: 1-based, inclusive
            # tight: the class reaches every edge of the box
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any(), (name, digit)


def test_scene_strokes_stand_out_from_the_background(scenes):
    contrast = []
    for name in ids(scenes, "train")[:60]:
        image = np.asarray(Image.open(scenes / "JPEGImages" / f"{name}.jpg"), dtype=np.float64) @ [0.299, 0.587, 0.114]
        mask = mask_of(scenes, name)
        for digit, (x0, y0, x1, y1), _ in objects(scenes, name):
            box_image, box_mask = image[y0 - 1:y1, x0 - 1:x1], mask[y0 - 1:y1, x0 - 1:x1]
            if (box_mask == 0).sum() >= 10:
                contrast.append(abs(box_image[box_mask == digit + 1].mean() - box_image[box_mask == 0].mean()))
    assert np.median(contrast) > 50 and np.mean(np.array(contrast) > 25) > 0.9


def test_train_and_val_draw_disjoint_source_digits(scenes):
    from sklearn.datasets import load_digits

    targets = load_digits().target
    used = {split: {(d, s) for name in ids(scenes, split) for d, _, s in objects(scenes, name)} for split in ("train", "val")}
    train_pool, val_pool = split_sources(len(targets), 0, 0.2)
    assert not set(train_pool) & set(val_pool) and len(train_pool) + len(val_pool) == len(targets)
    assert {s for _, s in used["train"]} <= set(train_pool.tolist())
    assert {s for _, s in used["val"]} <= set(val_pool.tolist())
    assert all(targets[s] == d for d, s in used["train"] | used["val"])  # each object is named by its source digit


def test_scenes_repeat_byte_for_byte_with_the_seed(tmp_path):
    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_digit_scenes(a, size=32, images=20, seed=3)
    write_digit_scenes(b, size=32, images=20, seed=3)
    write_digit_scenes(c, size=32, images=20, seed=4)
    fa, fb, fc = files(a), files(b), files(c)
    assert fa == fb and len(fa) == 20 * 3 + 5  # images, masks, annotations; classes.txt; the Segmentation and Main lists
    assert fa.keys() == fc.keys()
    changed = [k for k in fa if fa[k] != fc[k] and k.startswith("JPEGImages")]
    assert len(changed) == 20


def test_scenes_refuse_a_used_folder_and_bad_sizes(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(UserError, match="already exists"):
        write_digit_scenes(tmp_path / "used", images=4)
    with pytest.raises(UserError, match="empty"):
        write_digit_scenes(tmp_path / "one", images=1)
    with pytest.raises(UserError, match="too small"):
        write_digit_scenes(tmp_path / "small", size=8, images=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]


# ---- layouts and scan ---------------------------------------------------------------------------------
def test_scan_reads_the_voc_layout(scenes):
    assert detect_layout(scenes) == "voc"
    train, val = scan_segmentation(scenes)
    assert train.classes == val.classes == CLASSES
    assert [Path(m).stem for _, m in train.samples] == ids(scenes, "train")
    assert [Path(i).name for i, _ in val.samples] == [f"{n}.jpg" for n in ids(scenes, "val")]
    assert all(Path(i).stem == Path(m).stem for i, m in train.samples + val.samples)


def test_scan_finds_vocdevkit_and_defaults_to_the_voc_names(scenes, tmp_path):
    nested = tmp_path / "download"
    copy_of(scenes, nested / "VOCdevkit" / "VOC2012")
    (nested / "VOCdevkit" / "VOC2012" / "classes.txt").unlink()
    assert detect_layout(nested) == "voc"
    train, val = scan_segmentation(nested)
    assert train.classes == VOC_CLASSES and len(VOC_CLASSES) == 21 and VOC_CLASSES[:3] == ["background", "aeroplane", "bicycle"]
    assert len(train.samples) == N_IMAGES - N_VAL and len(val.samples) == N_VAL


@pytest.mark.parametrize("mode", ["P", "L"])
def test_scan_reads_the_folders_layout(scenes, tmp_path, mode):
    root = as_folders(scenes, tmp_path / "f", n=40, mode=mode)
    assert detect_layout(root) == "folders"
    train, val = scan_segmentation(root)
    assert train.classes == [f"class_{k}" for k in range(11)]  # from the largest mask value, 10
    assert len(train.samples) == len(val.samples) == 40
    assert [Path(i).stem for i, _ in train.samples] == sorted(ids(scenes, "train")[:40])
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n\n")
    assert scan_segmentation(root)[0].classes == CLASSES


def test_classification_folders_are_no_segmentation_set(small_data):
    assert detect_layout(small_data) is None
    with pytest.raises(UserError, match="not a segmentation data set"):
        scan_segmentation(small_data)


def test_load_mask_reads_palette_indices_not_colours(tmp_path):
    values = np.array([[0, 1, 2], [255, 7, 0]], np.uint8)
    im = Image.fromarray(values, "P")
    im.putpalette(voc_palette())
    im.save(tmp_path / "m.png")
    got = load_mask(tmp_path / "m.png")
    assert got.dtype == np.uint8 and got.tolist() == values.tolist()


# ---- bad inputs: one line naming the file -------------------------------------------------------------
def folders_error(scenes: Path, tmp_path: Path, breakage, *expected: str, classes: bool = True) -> str:
    root = as_folders(scenes, tmp_path / "f", n=4, classes=classes)
    breakage(root)
    with pytest.raises(UserError) as info:
        scan_segmentation(root)
    line = str(info.value)
    assert "\n" not in line and ": " in line
    for text in expected:
        assert text in line, line
    return line


def first(root: Path, split: str, kind: str) -> Path:
    return sorted((root / split / kind).iterdir())[0]


def test_image_without_mask(scenes, tmp_path):
    def extra_image(root):
        shutil.copy(first(root, "train", "images"), root / "train" / "images" / "lonely.jpg")
    folders_error(scenes, tmp_path, extra_image, "lonely.jpg", "has no mask", "add its mask")


def test_mask_without_image(scenes, tmp_path):
    def extra_mask(root):
        shutil.copy(first(root, "val", "masks"), root / "val" / "masks" / "orphan.png")
    folders_error(scenes, tmp_path, extra_mask, str(Path("val") / "masks" / "orphan.png"), "has no image")


def test_mask_of_another_size(scenes, tmp_path):
    def resize(root):
        mask = first(root, "val", "masks")
        Image.open(mask).resize((60, 64), Image.NEAREST).save(mask)
    line = folders_error(scenes, tmp_path, resize, "60x64", "64x64", "its image's size")
    assert str(Path("val") / "masks") in line


def test_mask_value_beyond_the_classes(scenes, tmp_path):
    def paint(root):
        mask = first(root, "train", "masks")
        values = np.array(Image.open(mask))
        values[0, 0] = 12
        Image.fromarray(values, "L").save(mask)
    folders_error(scenes, tmp_path, paint, "holds value 12", "classes.txt")


def test_mask_in_rgb_or_jpeg(scenes, tmp_path):
    def rgb(root):
        mask = first(root, "train", "masks")
        Image.open(mask).convert("RGB").save(mask)
    folders_error(scenes, tmp_path / "rgb", rgb, "is a RGB image", "palette (P)")

    def jpeg(root):
        mask = first(root, "train", "masks")
        Image.open(mask).convert("L").save(mask.with_suffix(".jpg"))
        mask.unlink()
    folders_error(scenes, tmp_path / "jpg", jpeg, ".jpg is a JPEG", "PNG")


def test_empty_split(scenes, tmp_path):
    def empty(root):
        for f in [*(root / "val" / "images").iterdir(), *(root / "val" / "masks").iterdir()]:
            f.unlink()
    folders_error(scenes, tmp_path, empty, str(Path("val") / "images"), "has no images")


def test_only_background_masks_need_classes(scenes, tmp_path):
    def blank(root):
        for split in ("train", "val"):
            for mask in (root / split / "masks").iterdir():
                Image.fromarray(np.zeros((64, 64), np.uint8), "L").save(mask)
    folders_error(scenes, tmp_path, blank, "background", classes=False)


def test_unreadable_image_is_named_or_skipped(scenes, tmp_path):
    root = as_folders(scenes, tmp_path / "f", n=4, classes=True)
    bad = first(root, "train", "images")
    bad.write_text("not a jpeg")
    with pytest.raises(UserError, match=f"unreadable image file {bad}.*--skip-bad-images"):
        scan_segmentation(root)
    train, _ = scan_segmentation(root, skip_bad=True)
    assert train.skipped == [str(bad)] and len(train.samples) == 3


def test_unreadable_mask_is_named(scenes, tmp_path):
    root = as_folders(scenes, tmp_path / "f", n=4, classes=True)
    bad = first(root, "val", "masks")
    bad.write_bytes(bad.read_bytes()[:60])  # header intact, pixel data cut
    with pytest.raises(UserError, match=f"unreadable image file {bad}"):
        scan_segmentation(root)
    _, val = scan_segmentation(root, skip_bad=True)
    assert val.skipped == [str(bad)] and len(val.samples) == 3


def test_voc_list_naming_missing_files(scenes, tmp_path):
    root = copy_of(scenes, tmp_path / "voc")
    name = ids(root, "val")[0]
    (root / "SegmentationClass" / f"{name}.png").unlink()
    with pytest.raises(UserError, match=f"val.txt names {name}, but .*{name}.png is missing"):
        scan_segmentation(root)
    (root / "JPEGImages" / f"{ids(root, 'train')[1]}.jpg").unlink()
    with pytest.raises(UserError, match=rf"train.txt names .*{ids(root, 'train')[1]}\.jpg is missing"):
        scan_segmentation(root)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n")
    with pytest.raises(UserError, match="train.txt names no images"):
        scan_segmentation(root)
    (root / "ImageSets" / "Segmentation" / "train.txt").unlink()
    with pytest.raises(UserError, match="has no ImageSets/Segmentation/train.txt"):
        scan_segmentation(root)


def test_voc_mask_value_beyond_the_voc_classes(scenes, tmp_path):
    root = copy_of(scenes, tmp_path / "voc")
    (root / "classes.txt").unlink()
    path = root / "SegmentationClass" / f"{ids(root, 'train')[2]}.png"
    values = np.array(Image.open(path))
    values[5, 5] = 21
    painted = Image.fromarray(values, "P")
    painted.putpalette(voc_palette())  # without a palette PIL would renumber the indices on save
    painted.save(path)
    assert load_mask(path)[5, 5] == 21
    with pytest.raises(UserError, match=f"mask {path} holds value 21, neither a class index below 21 nor 255"):
        scan_segmentation(root)


# ---- SegmentationDataset ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def blocks(tmp_path_factory) -> SegSplit:
    """Images that are a function of their masks (grey = 60 x class), lossless, of a few sizes: any
    misalignment between the image's and the mask's crop, resize or flip shows."""
    root = tmp_path_factory.mktemp("blocks")
    rng = np.random.default_rng(0)
    samples = []
    for k, (w, h) in enumerate([(80, 60), (40, 52), (96, 96), (30, 70)]):
        coarse = rng.integers(0, 4, (4, 4)).astype(np.uint8)
        mask = np.asarray(Image.fromarray(coarse, "L").resize((w, h), Image.NEAREST))
        image = np.repeat((mask * 60)[..., None], 3, -1).astype(np.uint8)
        Image.fromarray(image, "RGB").save(root / f"{k}.png")
        Image.fromarray(mask, "L").save(root / f"{k}_mask.png")
        samples.append((str(root / f"{k}.png"), str(root / f"{k}_mask.png")))
    return SegSplit(["background", "a", "b", "c"], samples)


def agreement(image: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of block-interior pixels (2 px from any other label) whose grey level is 60 x their class."""
    m = mask[None, None].float()
    uniform = (torch.nn.functional.max_pool2d(m, 5, 1, 2) == torch.nn.functional.max_pool2d(-m, 5, 1, 2).neg())[0, 0]
    interior = uniform & (mask != 255)
    return ((image[0] * 255 - mask * 60).abs() < 10)[interior].float().mean().item()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dataset_keeps_image_and_mask_aligned(blocks, training):
    dataset = SegmentationDataset(blocks, 48, training, seed=5)
    aligned, shifted = [], []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            image, mask, skipped = dataset[index]
            assert image.shape == (3, 48, 48) and image.dtype == torch.float32 and mask.shape == (48, 48) and mask.dtype == torch.int64
            assert skipped == 0 and 0 <= image.min() and image.max() <= 1
            assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 255}
            assert (image[:, mask == 255] == 0).all()  # padding: image 0 where the mask says ignore
            aligned.append(agreement(image, mask))
            shifted.append(agreement(image, mask.roll(3, -1)))  # what a 3-pixel misalignment would give
    assert min(aligned) > 0.99, aligned
    assert np.mean(shifted) < 0.95, shifted  # the check is sharp enough to see a small misalignment


def test_dataset_training_varies_scale_and_pads(blocks):
    dataset = SegmentationDataset(blocks, 48, True, seed=0)
    padded = 0
    for epoch in range(6):
        dataset.set_epoch(epoch)
        padded += sum(int((dataset[i][1] == 255).any()) for i in range(len(dataset)))
    assert 0 < padded < 24  # scale 0.5..2: some crops need padding, some do not


def test_flip_mirrors_image_and_mask_under_the_same_seed(scenes):
    train, _ = scan_segmentation(scenes)
    plain = SegmentationDataset(train, 40, True, seed=2, hflip=0.0)
    flipped = SegmentationDataset(train, 40, True, seed=2, hflip=1.0)
    for index in range(6):
        (a, ma, _), (b, mb, _) = plain[index], flipped[index]
        assert torch.equal(a.flip(-1), b) and torch.equal(ma.flip(-1), mb)
        assert not torch.equal(a, b)


def test_dataset_is_seeded_per_sample_and_epoch(scenes):
    import random

    train, _ = scan_segmentation(scenes)
    dataset = SegmentationDataset(train, 40, True, seed=1)
    torch.manual_seed(123)
    random.seed(123)
    first = [dataset[i] for i in (3, 4)]
    after = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(123)
    assert torch.equal(after[0], torch.rand(3)) and after[1] == random.random()  # the caller's streams are untouched
    again = SegmentationDataset(train, 40, True, seed=1)
    for (a, ma, _), (b, mb, _) in zip(first, [again[i] for i in (3, 4)]):
        assert torch.equal(a, b) and torch.equal(ma, mb)
    again.set_epoch(1)
    assert not torch.equal(again[3][0], first[0][0])
    assert not torch.equal(SegmentationDataset(train, 40, True, seed=2)[3][0], first[0][0])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_masks_are_resized_nearest(scenes, training):
    _, val = scan_segmentation(scenes)
    dataset = SegmentationDataset(val, 37, training, seed=0)  # an odd size: every pixel is resampled
    for index in range(12):
        original = set(np.unique(load_mask(val.samples[index][1])).tolist()) | {255}
        _, mask, _ = dataset[index]
        assert set(mask.unique().tolist()) <= original, index


def test_dataset_unreadable_file_stops_or_is_replaced(scenes, tmp_path):
    root = as_folders(scenes, tmp_path / "f", n=4, classes=True)
    train, _ = scan_segmentation(root)
    bad = Path(train.samples[1][0])
    bad.write_bytes(bad.read_bytes()[:300])  # passes the header check, fails to decode
    with pytest.raises(UserError, match=f"unreadable image file {bad}"):
        SegmentationDataset(train, 32, False)[1]
    skipping = SegmentationDataset(train, 32, False, skip_bad=True)
    image, mask, skipped = skipping[1]
    assert skipped == 1
    expected = SegmentationDataset(train, 32, False)[2]  # eval: the next sample, unchanged
    assert torch.equal(image, expected[0]) and torch.equal(mask, expected[1])


def test_loader_batches_do_not_depend_on_workers(scenes):
    from lcdistill.data import train_loader

    train, _ = scan_segmentation(scenes)
    small = SegSplit(train.classes, train.samples[:24])

    def batches(workers):
        loader = train_loader(SegmentationDataset(small, 32, True, seed=3), 8, workers, 3, 1, 0, False)
        loader.sampler.set_epoch(1, skip=8)  # resumed part-way into epoch 1
        loader.dataset.set_epoch(1)
        return list(loader)

    a, b = batches(0), batches(2)
    assert len(a) == len(b) == 2
    for (ia, ma, sa), (ib, mb, sb) in zip(a, b):
        assert ia.shape == (8, 3, 32, 32) and ma.shape == (8, 32, 32) and ma.dtype == torch.int64
        assert torch.equal(ia, ib) and torch.equal(ma, mb) and torch.equal(sa, sb)
