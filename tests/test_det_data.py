"""Detection data: VOC, COCO and YOLO layouts on disk, every refused input, the dataset's augmentation."""

from __future__ import annotations

import json
import pickle
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcdistill.data.detection import (
    VOC_CLASSES, DetectionDataset, DetSample, DetSplit, collate, detect_layout, scan_detection,
)
from lcdistill.data.scenes import write_digit_scenes
from lcdistill.errors import UserError

W, H = 64, 48  # the images the layouts below are built from


# ---- building layouts --------------------------------------------------------------------------------
def write_image(path: Path, size=(W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(path.name)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_xml(path: Path, objects, size=(W, H)) -> Path:
    """objects: (name, (xmin, ymin, xmax, ymax), difficult), written as VOC does (1-based pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<annotation><filename>{path.stem}.jpg</filename>"]
    if size:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, box, difficult in objects:
        coords = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        parts.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>{coords}</bndbox></object>")
    path.write_text("".join(parts) + "</annotation>")
    return path


VOC_OBJECTS = {
    "train": {"a": [("dog", (11, 6, 30, 25), 0), ("cat", (1, 1, W, H), 1)],  # the second covers the image, difficult
              "b": [("person", (50, 40, 70, 60), 0)],  # overhangs the 64x48 image: clipped
              "c": []},  # background
    "val": {"d": [("dog", (5, 5, 20, 20), 0)]},
}


def make_voc(root: Path, objects=VOC_OBJECTS) -> Path:
    """A VOC set nested as VOCdevkit/VOC2007 (as downloaded); returns that folder."""
    base = root / "VOCdevkit" / "VOC2007"
    for split, images in objects.items():
        for name, objs in images.items():
            write_image(base / "JPEGImages" / f"{name}.jpg")
            write_xml(base / "Annotations" / f"{name}.xml", objs)
        (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{n}\n" for n in images))
    return base


def coco_json(images, annotations, categories) -> dict:
    return {"images": [{"id": i, "file_name": f, "width": W, "height": H} for i, f in images],
            "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "iscrowd": crowd}
                            for k, (i, c, b, crowd) in enumerate(annotations)],
            "categories": categories}


COCO_CATEGORIES = [{"id": 12, "name": "zebra"}, {"id": 3, "name": "car"}, {"id": 7, "name": "bird"}]  # sorted by id: car, bird, zebra
COCO_TRAIN = ([(1, "000001.jpg"), (2, "000002.jpg")],  # 2 has no annotations: background
              [(1, 12, [10, 5, 20, 15], 0), (1, 3, [0, 0, 30, 30], 1), (1, 7, [50, 40, 20, 20], 0)])  # crowd; overhanging
COCO_VAL = ([(5, "000005.jpg")], [(5, 7, [1, 2, 3, 4], 0)])


def make_coco(root: Path, style: str = "instances", categories=COCO_CATEGORIES) -> dict[str, Path]:
    """COCO as downloaded (annotations/instances_*2017.json + train2017/) or as Roboflow exports it; the JSON paths."""
    paths = {}
    for split, (images, annotations) in (("train", COCO_TRAIN), ("val", COCO_VAL)):
        if style == "instances":
            folder, path = root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"
        else:
            folder = root / ("train" if split == "train" else "valid")
            path = folder / "_annotations.coco.json"
        for _, name in images:
            write_image(folder / name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(coco_json(images, annotations, categories)))
        paths[split] = path
    return paths


def make_yolo(root: Path, names: str = "yaml list") -> Path:
    write_image(root / "images" / "train" / "a.jpg")
    write_image(root / "images" / "train" / "b.png")  # no label file: a background image
    write_image(root / "images" / "val" / "c.jpg")
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.25 0.5\n\n0 0.05 0.5 0.2 0.2\n")  # the second overhangs the left edge
    (root / "labels" / "val" / "c.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    if names == "yaml list":
        (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnc: 2\nnames: [cat, dog]\n")
    elif names == "yaml dict":
        (root / "data.yaml").write_text("names:\n  0: cat\n  1: dog\n")
    else:  # labelImg writes classes.txt beside the labels
        (root / "labels" / "train" / "classes.txt").write_text("cat\ndog\n")
    return root


def by_name(split: DetSplit) -> dict[str, DetSample]:
    return {Path(s.image).stem: s for s in split.samples}


def refused(call, *named, match: str | None = None) -> str:
    """The one-line UserError `call` raises; it names every path in `named`."""
    with pytest.raises(UserError) as info:
        call()
    line = info.value.line()
    assert "\n" not in line and info.value.fix, line
    for path in named:
        assert str(path) in line, line
    if match:
        assert re.search(match, line), line
    return line


# ---- reading the layouts -----------------------------------------------------------------------------
def test_voc_nested_in_vocdevkit_converts_1_based_boxes_and_marks_difficult(tmp_path):
    base = make_voc(tmp_path)
    assert detect_layout(tmp_path) == "voc" and detect_layout(base) == "voc"
    train, val, report = scan_detection(tmp_path)
    assert train.classes == VOC_CLASSES == val.classes  # the names used are all VOC's
    a, b, c = (by_name(train)[n] for n in "abc")
    np.testing.assert_array_equal(a.boxes, [[10, 5, 30, 25], [0, 0, W, H]])  # (xmin - 1, ymin - 1, xmax, ymax)
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    assert a.labels.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("cat")]
    assert a.ignore.tolist() == [False, True] and a.size == (W, H)
    assert a.annotation == str(base / "Annotations" / "a.xml")
    np.testing.assert_array_equal(b.boxes, [[49, 39, W, H]])  # clipped
    assert c.boxes.shape == (0, 4) and len(c.labels) == 0
    assert report.layout == "voc" and report.images == {"train": 3, "val": 1}
    assert report.background == {"train": 1, "val": 0} and report.clipped == {"train": 1, "val": 0}
    assert report.boxes == {"train": 3, "val": 1} and report.ignored == {"train": 1, "val": 0}
    assert "1 background" in report.line()


def test_voc_classes_from_classes_txt_or_the_train_names(tmp_path):
    base = make_voc(tmp_path / "listed")
    (base / "classes.txt").write_text("background\nperson\ndog\ncat\n")  # segmentation's list: background dropped
    train, _, _ = scan_detection(tmp_path / "listed")
    assert train.classes == ["person", "dog", "cat"] and by_name(train)["a"].labels.tolist() == [1, 2]
    objects = {"train": {"a": [("zebra", (1, 1, 10, 10), 0), ("apple", (2, 2, 9, 9), 0)]}, "val": {"d": [("apple", (1, 1, 5, 5), 0)]}}
    make_voc(tmp_path / "own", objects)
    train, val, _ = scan_detection(tmp_path / "own")
    assert train.classes == ["apple", "zebra"] and by_name(train)["a"].labels.tolist() == [1, 0]


@pytest.mark.parametrize("style", ["instances", "roboflow"])
def test_coco_maps_sparse_category_ids_and_marks_crowds(tmp_path, style):
    categories = COCO_CATEGORIES
    if style == "roboflow":  # Roboflow adds the data set's name as category 0, grouping the others
        categories = [{"id": 0, "name": "things", "supercategory": "none"}] + [{**c, "supercategory": "things"} for c in COCO_CATEGORIES]
    paths = make_coco(tmp_path, style, categories)
    assert detect_layout(tmp_path) == "coco"
    train, val, report = scan_detection(tmp_path)
    assert train.classes == ["car", "bird", "zebra"] == val.classes
    one, two = by_name(train)["000001"], by_name(train)["000002"]
    np.testing.assert_array_equal(one.boxes, [[10, 5, 30, 20], [0, 0, 30, 30], [50, 40, W, H]])  # [x, y, w, h] -> XYXY, clipped
    assert one.labels.tolist() == [2, 0, 1] and one.ignore.tolist() == [False, True, False]
    assert one.annotation == str(paths["train"]) and len(two.labels) == 0
    np.testing.assert_array_equal(by_name(val)["000005"].boxes, [[1, 2, 4, 6]])
    assert report.background["train"] == 1 and report.clipped["train"] == 1 and report.ignored["train"] == 1


@pytest.mark.parametrize("names", ["yaml list", "yaml dict", "classes.txt"])
def test_yolo_reads_normalised_boxes_and_keeps_background_images(tmp_path, names):
    make_yolo(tmp_path, names)
    assert detect_layout(tmp_path) == "yolo"
    train, val, report = scan_detection(tmp_path)
    assert train.classes == ["cat", "dog"]
    a, b = by_name(train)["a"], by_name(train)["b"]
    np.testing.assert_allclose(a.boxes, [[24, 12, 40, 36], [0, 19.2, 9.6, 28.8]], atol=1e-4)
    assert a.labels.tolist() == [1, 0] and not a.ignore.any() and a.size == (W, H)
    assert b.boxes.shape == (0, 4) and b.annotation == b.image
    assert report.background == {"train": 1, "val": 0} and report.clipped == {"train": 1, "val": 0}
    assert detect_layout(tmp_path / "images") is None


def test_digit_scenes_read_as_voc_detection(tmp_path):
    out = tmp_path / "scenes"
    write_digit_scenes(out, size=128, images=20)
    for split in ("train", "val"):
        assert (out / "ImageSets" / "Main" / f"{split}.txt").read_text() == (out / "ImageSets" / "Segmentation" / f"{split}.txt").read_text()
    train, val, report = scan_detection(out)
    assert train.classes == [str(d) for d in range(10)]  # classes.txt's background dropped
    assert len(train.samples) + len(val.samples) == 20 and report.boxes["train"] > 0
    for sample in train.samples + val.samples:
        objects = ET.parse(sample.annotation).getroot().findall("object")
        expected = [[int(o.findtext(f"bndbox/{k}")) - d for k, d in (("xmin", 1), ("ymin", 1), ("xmax", 0), ("ymax", 0))] for o in objects]
        np.testing.assert_array_equal(sample.boxes.reshape(-1, 4), np.array(expected).reshape(-1, 4))
        assert sample.labels.tolist() == [int(o.findtext("name")) for o in objects]
        assert sample.size == (128, 128)


# ---- every refused input -----------------------------------------------------------------------------
def test_empty_boxes_are_refused_in_each_layout(tmp_path):
    base = make_voc(tmp_path / "voc")
    xml = write_xml(base / "Annotations" / "a.xml", [("dog", (30, 6, 11, 25), 0)])  # xmax < xmin
    refused(lambda: scan_detection(tmp_path / "voc"), xml, match="no width or height")
    paths = make_coco(tmp_path / "coco")
    data = json.loads(paths["train"].read_text())
    data["annotations"][0]["bbox"] = [10, 5, 20, 0]  # no height
    paths["train"].write_text(json.dumps(data))
    refused(lambda: scan_detection(tmp_path / "coco"), paths["train"], match="no width or height")
    root = make_yolo(tmp_path / "yolo")
    (root / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0 0.2\n")
    refused(lambda: scan_detection(root), root / "labels" / "train" / "a.txt", match="line 1 .*no width or height")


def test_a_box_wholly_outside_its_image_is_refused(tmp_path):
    base = make_voc(tmp_path)
    xml = write_xml(base / "Annotations" / "b.xml", [("dog", (70, 10, 90, 20), 0)])
    refused(lambda: scan_detection(tmp_path), xml, base / "JPEGImages" / "b.jpg", match="wholly outside its 64x48 image")


def test_unknown_classes_are_refused(tmp_path):
    base = make_voc(tmp_path / "voc")
    (base / "classes.txt").write_text("dog\ncat\n")
    refused(lambda: scan_detection(tmp_path / "voc"), base / "Annotations" / "b.xml", base / "classes.txt", match="'person'")
    paths = make_coco(tmp_path / "coco")
    data = json.loads(paths["train"].read_text())
    data["annotations"][1]["category_id"] = 99
    paths["train"].write_text(json.dumps(data))
    refused(lambda: scan_detection(tmp_path / "coco"), paths["train"], match="category_id 99")
    paths = make_coco(tmp_path / "coco_val", categories=COCO_CATEGORIES)
    data = json.loads(paths["val"].read_text())
    data["categories"].append({"id": 40, "name": "ghost"})
    data["annotations"][0]["category_id"] = 40
    paths["val"].write_text(json.dumps(data))
    refused(lambda: scan_detection(tmp_path / "coco_val"), paths["val"], paths["train"], match="category_id 40")
    root = make_yolo(tmp_path / "yolo")
    (root / "labels" / "val" / "c.txt").write_text("2 0.5 0.5 0.2 0.2\n")
    refused(lambda: scan_detection(root), root / "labels" / "val" / "c.txt", root / "data.yaml", match="class 2")


def test_annotations_without_images_are_refused(tmp_path):
    paths = make_coco(tmp_path / "coco")
    data = json.loads(paths["train"].read_text())
    data["annotations"][0]["image_id"] = 77
    paths["train"].write_text(json.dumps(data))
    refused(lambda: scan_detection(tmp_path / "coco"), paths["train"], match="image_id 77")
    root = make_yolo(tmp_path / "yolo")
    (root / "labels" / "train" / "z.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    refused(lambda: scan_detection(root), root / "labels" / "train" / "z.txt", match="no image")
    base = make_voc(tmp_path / "voc")
    (base / "JPEGImages" / "d.jpg").unlink()
    refused(lambda: scan_detection(tmp_path / "voc"), base / "ImageSets" / "Main" / "val.txt", base / "JPEGImages" / "d", match="missing")


def test_listed_images_without_files_are_refused(tmp_path):
    base = make_voc(tmp_path / "voc")
    (base / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nc\nnone\n")
    refused(lambda: scan_detection(tmp_path / "voc"), base / "ImageSets" / "Main" / "train.txt", match="names none")
    paths = make_coco(tmp_path / "coco")
    (tmp_path / "coco" / "train2017" / "000002.jpg").unlink()
    refused(lambda: scan_detection(tmp_path / "coco"), paths["train"], tmp_path / "coco" / "train2017" / "000002.jpg")
    paths = make_coco(tmp_path / "nowhere")
    for f in (tmp_path / "nowhere" / "val2017").iterdir():
        f.unlink()
    refused(lambda: scan_detection(tmp_path / "nowhere"), paths["val"], match="none of")


def test_malformed_xml_and_json_are_refused(tmp_path):
    base = make_voc(tmp_path / "voc")
    (base / "Annotations" / "a.xml").write_text("<annotation><object><name>dog</name></annotation>")
    refused(lambda: scan_detection(tmp_path / "voc"), base / "Annotations" / "a.xml", match="not well-formed XML")
    write_xml(base / "Annotations" / "a.xml", [("dog", (1, 1, "ten", 10), 0)])
    refused(lambda: scan_detection(tmp_path / "voc"), base / "Annotations" / "a.xml", match="non-numeric")
    paths = make_coco(tmp_path / "coco")
    paths["val"].write_text('{"images": [}')
    refused(lambda: scan_detection(tmp_path / "coco"), paths["val"], match="not valid JSON")
    paths["val"].write_text('{"images": []}')
    refused(lambda: scan_detection(tmp_path / "coco"), paths["val"], match="lacks an images, annotations or categories")
    data = coco_json(*COCO_VAL, COCO_CATEGORIES)
    data["annotations"][0]["bbox"] = [1, 2, 3]
    paths["val"].write_text(json.dumps(data))
    refused(lambda: scan_detection(tmp_path / "coco"), paths["val"], match="not \\[x, y, width, height\\]")


@pytest.mark.parametrize("line, match", [
    ("0 0.5 0.5 0.2", "4 fields"),
    ("0 0.5 0.5 0.2 0.2 0.3 0.4", "7 fields"),  # a polygon
    ("0 0.5 0.5 1.2 0.2", "outside \\[0, 1\\]"),
    ("0 0.5 -0.1 0.2 0.2", "outside \\[0, 1\\]"),
    ("0 0.5 abc 0.2 0.2", "non-number"),
    ("0 0.5 nan 0.2 0.2", "outside \\[0, 1\\]"),
    ("1.5 0.5 0.5 0.2 0.2", "class 1.5"),
])
def test_malformed_yolo_lines_are_refused(tmp_path, line, match):
    root = make_yolo(tmp_path)
    label = root / "labels" / "train" / "a.txt"
    label.write_text(f"1 0.5 0.5 0.2 0.2\n{line}\n")
    refused(lambda: scan_detection(root), label, match=f"line 2 of .*{match}")


def test_a_train_split_without_boxes_is_refused(tmp_path):
    make_voc(tmp_path / "voc", {"train": {"a": [], "b": []}, "val": {"d": [("dog", (1, 1, 5, 5), 0)]}})
    refused(lambda: scan_detection(tmp_path / "voc"), tmp_path / "voc", match="train split .*has no boxes")
    make_voc(tmp_path / "hard", {"train": {"a": [("dog", (1, 1, 5, 5), 1)]}, "val": {"d": []}})
    refused(lambda: scan_detection(tmp_path / "hard"), tmp_path / "hard", match="no boxes but 1 marked difficult or crowd")
    root = make_yolo(tmp_path / "yolo")
    (root / "labels" / "train" / "a.txt").write_text("\n")  # empty: background, as b is
    refused(lambda: scan_detection(root), root, match="train split .*has no boxes")


def test_annotation_sizes_are_checked_against_the_image(tmp_path):
    base = make_voc(tmp_path)
    xml = write_xml(base / "Annotations" / "a.xml", [("dog", (1, 1, 10, 10), 0)], size=(48, 64))
    refused(lambda: scan_detection(tmp_path), xml, base / "JPEGImages" / "a.jpg", match="48x64, but the file is 64x48")
    scan_detection(tmp_path, check=False)  # trusted unchecked
    write_xml(base / "Annotations" / "a.xml", [("dog", (1, 1, 70, 10), 0)], size=None)  # no size: the header gives it
    train, _, report = scan_detection(tmp_path)
    np.testing.assert_array_equal(by_name(train)["a"].boxes, [[0, 0, W, 10]])
    assert report.clipped["train"] == 2


def test_unreadable_images_stop_the_scan_or_are_skipped(tmp_path):
    root = make_yolo(tmp_path)
    bad = root / "images" / "train" / "b.png"
    bad.write_bytes(b"not an image")
    refused(lambda: scan_detection(root), bad, match="unreadable image file")
    train, _, _ = scan_detection(root, skip_bad=True)
    assert train.skipped == [str(bad)] and [Path(s.image).name for s in train.samples] == ["a.jpg"]


def test_several_voc_years_are_refused(tmp_path):
    make_voc(tmp_path)
    (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)
    (tmp_path / "VOCdevkit" / "VOC2012" / "Annotations").mkdir()
    refused(lambda: scan_detection(tmp_path / "VOCdevkit"), tmp_path / "VOCdevkit", match="2 VOC sets")
    refused(lambda: scan_detection(tmp_path / "nothing"), tmp_path / "nothing", match="not found")


# ---- the dataset -------------------------------------------------------------------------------------
def one_image_split(tmp_path: Path, size, boxes, labels, ignore) -> DetSplit:
    image = write_image(tmp_path / "one.png", size)
    sample = DetSample(str(image), np.array(boxes, np.float32), np.array(labels, np.int64), np.array(ignore, bool), size, str(image))
    return DetSplit(["a", "b"], [sample])


def test_training_samples_repeat_with_seed_epoch_and_index(tmp_path):
    write_digit_scenes(tmp_path / "scenes", size=64, images=12)
    train, _, _ = scan_detection(tmp_path / "scenes")
    ds, again = DetectionDataset(train, 64, training=True, seed=3), DetectionDataset(train, 64, training=True, seed=3)
    copy = pickle.loads(pickle.dumps(ds))  # as a spawned loader worker gets it
    assert torch.equal(copy[1][0], ds[1][0])
    differs = False
    for index in range(4):
        (x, tx, n), (y, ty, _) = ds[index], again[index]
        assert isinstance(x, torch.Tensor) and type(x).__name__ == "Image" and x.dtype == torch.float32 and n == 0
        assert x.shape == (3, 64, 64) and 0 <= float(x.min()) and float(x.max()) <= 1
        assert torch.equal(x, y) and torch.equal(tx["boxes"], ty["boxes"]) and torch.equal(tx["labels"], ty["labels"])
        assert tx["boxes"].canvas_size == (64, 64) and tx["labels"].dtype == torch.int64 and tx["ignore"].dtype == torch.bool
        again.set_epoch(1)
        z, tz, _ = again[index]
        differs |= not torch.equal(x, z)
        again.set_epoch(0)
    assert differs, "another epoch should augment differently"


def test_the_flip_moves_boxes_and_pixels_together(tmp_path):
    split = one_image_split(tmp_path, (64, 64), [[10, 5, 30, 25]], [1], [False])
    image, target, _ = DetectionDataset(split, 64, training=True, scale=(1.0, 1.0), hflip=1.0)[0]
    plain, _, _ = DetectionDataset(split, 64, training=False)[0]
    assert target["boxes"].tolist() == [[64 - 30, 5, 64 - 10, 25]]  # x -> width - x, by hand
    assert torch.equal(image, torch.flip(plain, dims=[-1]))


def test_sanitize_drops_degenerate_boxes_with_their_labels_and_flags(tmp_path):
    # 200x100 resized to 100 wide: the 1 px wide box becomes 0.5 px and goes in training, stays in eval
    split = one_image_split(tmp_path, (200, 100), [[10, 10, 11, 60], [40, 20, 120, 80]], [0, 1], [True, False])
    _, target, _ = DetectionDataset(split, 100, training=True, scale=(1.0, 1.0), hflip=0.0)[0]
    assert target["labels"].tolist() == [1] and target["ignore"].tolist() == [False]
    (x0, y0, x1, y1), = target["boxes"].tolist()  # 100x50 padded to 100x100 at a random height
    assert (x0, x1, y1 - y0) == (20, 60, 30) and target["boxes"].canvas_size == (100, 100)
    image, target, _ = DetectionDataset(split, 100, training=False)[0]
    assert image.shape == (3, 50, 100) and target["boxes"].canvas_size == (50, 100)  # the longer side to size, unpadded
    assert target["labels"].tolist() == [0, 1] and torch.allclose(target["boxes"].as_subclass(torch.Tensor), torch.tensor([[5, 5, 5.5, 30], [20, 10, 60, 40]]))


def test_collate_keeps_lists_and_bad_files_follow_the_policy(tmp_path):
    make_yolo(tmp_path)
    train, _, _ = scan_detection(tmp_path)
    ds = DetectionDataset(train, 32, training=False)
    images, targets, skipped = collate([ds[0], ds[1]])
    assert isinstance(images, list) and [tuple(i.shape) for i in images] == [(3, 24, 32), (3, 24, 32)]
    assert isinstance(targets, list) and targets[0]["labels"].tolist() == [1, 0] and len(targets[1]["labels"]) == 0
    assert skipped.tolist() == [0, 0] and DetectionDataset.collate is not None
    (tmp_path / "images" / "train" / "a.jpg").write_bytes(b"broken")
    refused(lambda: ds[0], tmp_path / "images" / "train" / "a.jpg", match="unreadable image file")
    _, target, attempts = DetectionDataset(train, 32, training=False, skip_bad=True)[0]
    assert attempts == 1 and len(target["labels"]) == 0  # b.png took its place
    write_image(tmp_path / "images" / "train" / "b.png", (32, 32))
    refused(lambda: ds[1], tmp_path / "images" / "train" / "b.png", match="is 32x32, but its boxes are for 64x48")
