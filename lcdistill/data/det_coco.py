"""COCO detection data read into the common form (det_layouts.DetSample).

    ROOT/annotations/instances_{train,val}*.json, images in ROOT/<name after instances_>/ (train2017/),
    ROOT/images/<that name>/, ROOT/images/ or ROOT, whichever holds the first listed file_name;
    or Roboflow's ROOT/train/_annotations.coco.json with its images beside it, and valid/ (or val/).

Classes are the train file's categories sorted by id (ids need not be contiguous), bbox [x, y, w, h]
becomes XYXY, and iscrowd marks a box ignore (kept out of the metric, as COCO's evaluation does).
"""

from __future__ import annotations

import json
from pathlib import Path

from lcdistill.data.det_layouts import SPLITS, Boxes, Read, Sizer, clip_text
from lcdistill.errors import UserError

COCO_FIX = ("write COCO instances JSON: images (id, file_name, width, height), "
            "annotations (id, image_id, category_id, bbox [x, y, width, height]), categories (id, name)")


# ---- reading ------------------------------------------------------------------------------------------
def coco_sources(root: Path) -> dict[str, tuple[list[Path], list[Path]]]:
    """Per split found: (its JSON files, the folders its images may be in); empty when not COCO."""
    found = {}
    for split in SPLITS:
        files = sorted((root / "annotations").glob(f"instances_{split}*.json")) if (root / "annotations").is_dir() else []
        if files:
            tag = files[0].stem[len("instances_"):]
            found[split] = (files, [root / tag, root / "images" / tag, root / "images", root])
    if found:
        return found
    for split, folders in (("train", ("train",)), ("val", ("valid", "val"))):  # Roboflow's export
        folder = next((root / f for f in folders if (root / f / "_annotations.coco.json").is_file()), None)
        if folder is not None:
            found[split] = ([folder / "_annotations.coco.json"], [folder])
    return found


def _coco_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise UserError(f"COCO file {path} is not valid JSON ({e.msg} at line {e.lineno})", "fix it or export it again") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"COCO file {path} cannot be read ({type(e).__name__})", "restore it as UTF-8 JSON") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise UserError(f"COCO file {path} lacks an images, annotations or categories list", COCO_FIX)
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coco_entries(path: Path, data: dict):
    """(images {id: (file_name, size or None)}, categories {id: entry}, annotations) of a checked COCO file."""
    images, categories = {}, {}
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not _is_int(im.get("id")) or not isinstance(im.get("file_name"), str):
            raise UserError(f"COCO file {path}: images[{k}] lacks an integer id or a file_name", COCO_FIX)
        if im["id"] in images:
            raise UserError(f"COCO file {path} lists image id {im['id']} twice", "give each image its own id")
        w, h = im.get("width"), im.get("height")
        images[im["id"]] = (im["file_name"], (w, h) if _is_int(w) and _is_int(h) and w > 0 and h > 0 else None)
    for k, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise UserError(f"COCO file {path}: categories[{k}] lacks an integer id or a name", COCO_FIX)
        if cat["id"] in categories:
            raise UserError(f"COCO file {path} lists category id {cat['id']} twice", "give each category its own id")
        categories[cat["id"]] = cat
    annotations = []
    for k, ann in enumerate(data["annotations"]):
        where = f"annotation {ann.get('id', k) if isinstance(ann, dict) else k} in {path}"
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise UserError(f"{where} has bbox {clip_text(repr(bbox))}, not [x, y, width, height]", COCO_FIX)
        if ann.get("image_id") not in images:
            raise UserError(f"{where} is for image_id {clip_text(repr(ann.get('image_id')))}, which its images list lacks",
                            "add the image to images or delete the annotation")
        if ann.get("category_id") not in categories:
            raise UserError(f"{where} has category_id {clip_text(repr(ann.get('category_id')))}, which its categories list lacks",
                            "add the category or fix the id")
        annotations.append((where, ann))
    return images, categories, annotations


def _only_groups(parsed: dict) -> set[int]:
    """Category ids that only group others and label no box (Roboflow writes the data set's name as category 0)."""
    used = {ann["category_id"] for _, _, anns in parsed.values() for _, ann in anns}
    cats = parsed["train"][1]
    parents = {c.get("supercategory") for i, c in cats.items()}
    return {i for i, c in cats.items() if i not in used and c["name"] in parents
            and any(o.get("supercategory") == c["name"] for j, o in cats.items() if j != i)}


def _image_folder(path: Path, folders: list[Path], images: dict) -> Path:
    first = next(iter(images.values()), None)
    if first is None:
        return folders[0]
    folder = next((f for f in folders if (f / first[0]).is_file()), None)
    if folder is None:
        raise UserError(f"COCO file {path} lists image {first[0]}, found in none of {', '.join(map(str, dict.fromkeys(folders)))}",
                        "put the images in one of those folders, or fix file_name")
    return folder


def read_coco(root: Path, sizer: Sizer) -> Read:
    sources = coco_sources(root)
    parsed, folders = {}, {}
    for split in SPLITS:
        if split not in sources:
            raise UserError(f"COCO data set {root} has no {split} annotations",
                            f"add annotations/instances_{split}2017.json, or {'train' if split == 'train' else 'valid'}/_annotations.coco.json")
        files, candidates = sources[split]
        if len(files) > 1:
            raise UserError(f"{files[0].parent} holds {len(files)} {split} annotation files ({files[0].name}, {files[1].name})", "keep one per split")
        parsed[split] = _coco_entries(files[0], _coco_json(files[0]))
        folders[split] = (files[0], _image_folder(files[0], candidates, parsed[split][0]))
    train_json = folders["train"][0]
    groups = _only_groups(parsed)
    kept = sorted(i for i in parsed["train"][1] if i not in groups)
    classes = [parsed["train"][1][i]["name"] for i in kept]
    label = {i: k for k, i in enumerate(kept)}
    samples, clipped = {}, {}
    for split, (images, categories, annotations) in parsed.items():
        path, folder = folders[split]
        by_image: dict[int, list] = {i: [] for i in images}
        for where, ann in annotations:
            i = ann["category_id"]
            if i not in label or categories[i]["name"] != classes[label[i]]:
                raise UserError(f"{where} has category_id {i} ({categories[i]['name']}), not one of the categories of {train_json}",
                                "give train and val the same categories (ids and names)")
            by_image[ann["image_id"]].append((where, ann))
        samples[split], clipped[split] = [], 0
        for image_id, (name, given) in images.items():
            image = folder / name
            if not image.is_file():
                raise UserError(f"COCO file {path} lists image {name} (id {image_id}), but {image} is missing",
                                "restore the file, or remove it and its annotations from the JSON")
            size = sizer.size(split, str(image), given, f"COCO file {path}")
            if size is None:
                continue
            boxes = Boxes(str(image), size)
            for where, ann in by_image[image_id]:
                x, y, w, h = (float(v) for v in ann["bbox"])
                boxes.add(where, f"bbox [{x:g}, {y:g}, {w:g}, {h:g}]", (x, y, x + w, y + h), label[ann["category_id"]], bool(ann.get("iscrowd", 0)))
            samples[split].append(boxes.sample(path))
            clipped[split] += boxes.clipped
    return Read(classes, samples, clipped)
