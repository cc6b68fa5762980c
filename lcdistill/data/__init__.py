"""Data for lcdistill: image files, classification ImageFolders (CPU and GPU paths), segmentation sets.

    images           which files are images, `load_rgb`, the unreadable-file error
    samples          the shared per-sample policies: augmentation seed, skipping bad files
    folder           classification ImageFolder: `scan`, `Split`, `ImageDataset`
    timm_transforms  the CPU augmentation (timm's create_transform)
    loaders          train/eval DataLoaders, `normalize`
    gpu              JPEG decode and augmentation on the device (data.gpu_decode)
    digits           `write_digits`, the bundled digits as an ImageFolder
    scenes           `write_digit_scenes`, digits pasted on backgrounds as a VOC segmentation set
    segmentation     segmentation sets (VOC or train/images + train/masks): `scan_segmentation`, `SegmentationDataset`
    crops            `write_digit_crops`, digits at random scale and place on noisy backgrounds as an ImageFolder
    detection        detection sets (VOC, COCO, YOLO; readers in det_layouts and det_coco): `scan_detection`, `DetectionDataset`
"""

from lcdistill.data.digits import write_digits
from lcdistill.data.folder import PRECHECK_LIMIT, ImageDataset, Split, images_under, readable, scan, scan_split
from lcdistill.data.images import DECODE_ERRORS, IMAGE_EXTENSIONS, check_image, load_rgb, unreadable
from lcdistill.data.loaders import ResumableSampler, eval_loader, init_worker, normalize, train_loader
from lcdistill.data.samples import first_readable, sample_seed, seeded
from lcdistill.data.timm_transforms import eval_transform, transforms

from lcdistill.data import gpu, scenes, segmentation  # noqa: E402,I001  (data.gpu.pick, data.segmentation.scan_segmentation, ...)

__all__ = [
    "DECODE_ERRORS", "IMAGE_EXTENSIONS", "PRECHECK_LIMIT", "ImageDataset", "ResumableSampler", "Split", "check_image",
    "eval_loader", "eval_transform", "first_readable", "gpu", "scenes", "segmentation", "images_under", "init_worker", "load_rgb", "normalize", "readable",
    "sample_seed", "scan", "scan_split", "seeded", "train_loader", "transforms", "unreadable", "write_digits",
]
