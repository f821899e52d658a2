"""Image data for :mod:`stvit.train`: an ImageFolder reader and a generated set, without torchvision.

Layout of a data folder (the ImageFolder convention)::

    DATA/train/<class name>/<image files>      one folder per class, any depth below it
    DATA/val/<class name>/<image files>        the same class names

Images are read with PIL. Training images get a random resized crop (area 8-100% of the image,
aspect 3/4-4/3) and a random horizontal flip; validation images a centre crop of ``crop_pct`` of
the shorter side. Every random choice of sample ``i`` in epoch ``e`` comes from a generator seeded by
``(seed, e, i)``, so the augmentation does not depend on the number of loader workers or processes
and a resumed run sees exactly the images the uninterrupted run would have seen.

Example:
    >>> train = ImageFolder("data/train", img_size=224, train=True)
    >>> val = ImageFolder("data/val", img_size=224, train=False, classes=train.classes)
    >>> x, y = train[0]                      # x: [3, 224, 224] float32 (normalised), y: int
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["ImageFolder", "SyntheticImages", "IMG_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD",
           "check_img_size", "find_classes"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: STViT downsamples by 4 (stem) and then by 2 three times.
STRIDE = 32


def check_img_size(img_size: int) -> int:
    """``img_size`` if it is a positive multiple of 32 (the model's total stride), else ``ValueError``."""
    if not isinstance(img_size, int) or img_size <= 0 or img_size % STRIDE:
        lower = max(STRIDE, (int(img_size) // STRIDE) * STRIDE) if isinstance(img_size, int) else STRIDE
        raise ValueError(
            f"image size {img_size!r} does not divide by {STRIDE}: STViT downsamples by {STRIDE} "
            f"(stem /4, then /2 three times), so the size must be a multiple of {STRIDE} "
            f"(e.g. {lower} or {lower + STRIDE})")
    return img_size


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (a fixed polynomial hash: the same on every machine)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h * 0x100000001B3 + int(p) + 0x632BE59BD9B4E019) % (1 << 63)
    return h


def find_classes(root: str) -> Tuple[List[str], List[Tuple[str, int]]]:
    """Class names (sorted sub-folder names of ``root``) and the ``(path, class index)`` of every
    image below them. A missing ``root``, a ``root`` without class folders and a class folder
    without images raise an error that names the folder."""
    if not os.path.isdir(root):
        what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise FileNotFoundError(f"data folder {root!r} {what}; expected {root}/<class name>/<images>")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"data folder {root!r} has no class folders; expected "
                         f"{root}/<class name>/<images> (one folder per class)")
    samples: List[Tuple[str, int]] = []
    for idx, name in enumerate(classes):
        folder = os.path.join(root, name)
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames.sort()
            found += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")]
        if not found:
            raise ValueError(f"class folder {folder!r} has no images (looked for "
                             f"{', '.join(IMG_EXTENSIONS)} at any depth): every class needs at "
                             f"least one image; add some or remove the folder")
        samples += [(p, idx) for p in found]
    return classes, samples


def _to_tensor(img, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1).div_(255.)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _random_resized_box(w: int, h: int, g: torch.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """A random crop box ``(left, top, right, bottom)`` of ``scale`` of the area and aspect ratio in
    ``ratio`` (log-uniform); after 10 failed draws, the centre crop with the ratio clamped."""
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(u[2] * (w - cw + 1)), int(u[3] * (h - ch + 1))
            return left, top, left + cw, top + ch
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif aspect > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


class ImageFolder(Dataset):
    """Images in ``root/<class>/...`` as ``(x [3, img_size, img_size] float32, class index)``.

    Args:
        root: the folder; its sorted sub-folders are the classes.
        img_size: output side, a multiple of 32.
        train: random resized crop + horizontal flip (else the centre crop of ``crop_pct``).
        classes: the class list to enforce (validation: the training classes); a folder whose
            classes differ raises ``ValueError``.
        seed: base seed of the augmentation (see the module docstring).
        crop_pct: the share of the shorter side the validation centre crop keeps.
    """

    def __init__(self, root: str, img_size: int, train: bool, classes: Optional[Sequence[str]] = None,
                 seed: int = 0, crop_pct: float = 0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.root = root
        self.img_size = check_img_size(img_size)
        self.train = train
        self.classes, self.samples = find_classes(root)
        if classes is not None and list(classes) != self.classes:
            missing = sorted(set(classes) - set(self.classes))
            extra = sorted(set(self.classes) - set(classes))
            raise ValueError(f"the classes of {root!r} differ from the training classes: "
                             f"missing {missing}, extra {extra}")
        self.seed, self.epoch = seed, 0
        self.crop_pct, self.mean, self.std = crop_pct, mean, std

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentation of ``epoch`` (call before creating the loader's iterator)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            img = im.convert("RGB")
        w, h = img.size
        s = self.img_size
        if self.train:
            g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, i))
            box = _random_resized_box(w, h, g)
            img = img.resize((s, s), Image.BICUBIC, box=box)
            if torch.rand(1, generator=g).item() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            side = min(w, h) * self.crop_pct
            left, top = (w - side) / 2, (h - side) / 2
            img = img.resize((s, s), Image.BICUBIC, box=(left, top, left + side, top + side))
        return _to_tensor(img, self.mean, self.std), label


class SyntheticImages(Dataset):
    """A generated classification set: class ``c`` is a smooth random colour pattern (a 3 x 4 x 4
    Gaussian field upsampled to ``img_size``) and sample ``i`` (class ``i % num_classes``) is its
    class pattern plus unit Gaussian noise drawn from ``(seed, split, i)``. Training and validation
    sets of the same ``seed`` share the class patterns (pass different ``split`` values). Learnable
    in a few steps: a smoke test of the training pipeline, not a benchmark.

    ``x: [3, img_size, img_size]`` float32, ``y: int``.
    """

    def __init__(self, num_samples: int, num_classes: int, img_size: int, seed: int = 0, split: int = 0):
        if num_samples <= 0 or num_classes < 2:
            raise ValueError(f"a synthetic set needs num_samples > 0 and num_classes >= 2, got "
                             f"{num_samples} and {num_classes}")
        self.img_size = check_img_size(img_size)
        self.num_samples, self.num_classes = int(num_samples), int(num_classes)
        self.classes = [f"class_{c}" for c in range(num_classes)]
        self.seed, self.split = seed, split
        g = torch.Generator().manual_seed(_seed(seed, 0x5EED))
        low = torch.randn(num_classes, 3, 4, 4, generator=g)
        self.patterns = F.interpolate(low, size=(img_size, img_size), mode="bilinear", align_corners=False)

    def set_epoch(self, epoch: int) -> None:  # the samples do not change between epochs
        pass

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        label = i % self.num_classes
        g = torch.Generator().manual_seed(_seed(self.seed, self.split, i))
        noise = torch.randn(self.patterns.shape[1:], generator=g)
        return self.patterns[label] + noise, label
