"""Images of any size for a model of a fixed input size: the torchvision convention.

- training: RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) then RandomHorizontalFlip(0.5): a crop of
  8-100% of the image area with log-uniform aspect ratio 3/4..4/3 (10 tries, then the central crop at the
  nearest allowed ratio), resized bilinearly to the model's H x W;
- test: Resize(int(max(H, W) / 0.875)) of the shorter side (the longer one scaled alike, truncated), then
  CenterCrop(H, W) (224 <- 256 as in torchvision's ImageNet recipe).

Resizing is PIL's bilinear filter on the uint8 image (antialiased when shrinking), so crop, resize and flip give
what torchvision's transforms give on a PIL image. The random numbers come from the caller's generator (the
stream's counter-based one), so a batch is a function of (seed, epoch, index) and a resumed run sees the same crops.
"""

from __future__ import annotations

import math

import numpy as np

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_FRACTION = 0.875


def rrc_params(rng: np.random.Generator, height: int, width: int, scale=SCALE, ratio=RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop, torchvision's `RandomResizedCrop.get_params` with numpy draws."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _pil(img_hwc: np.ndarray):
    from PIL import Image

    return Image.fromarray(img_hwc[:, :, 0] if img_hwc.shape[2] == 1 else img_hwc, "L" if img_hwc.shape[2] == 1
                           else "RGB")


def _array(im, channels: int) -> np.ndarray:
    a = np.asarray(im)
    return a.reshape(a.shape[0], a.shape[1], channels)


def resized_crop(img_hwc: np.ndarray, top: int, left: int, h: int, w: int, out_hw: tuple[int, int],
                 flip: bool = False) -> np.ndarray:
    """Crop [top:top+h, left:left+w] of a uint8 HxWxC image, resize it bilinearly to out_hw, mirror if `flip`."""
    from PIL import Image

    im = _pil(img_hwc).crop((left, top, left + w, top + h)).resize((out_hw[1], out_hw[0]), Image.BILINEAR)
    out = _array(im, img_hwc.shape[2])
    return out[:, ::-1] if flip else out


def resize_center_crop(img_hwc: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Shorter side to int(max(out_hw) / 0.875) (bilinear), then the central out_hw crop."""
    from PIL import Image

    ih, iw = img_hwc.shape[:2]
    short = int(max(out_hw) / CROP_FRACTION)
    if iw <= ih:
        nw, nh = short, int(short * ih / iw)
    else:
        nh, nw = short, int(short * iw / ih)
    im = _pil(img_hwc)
    if (nh, nw) != (ih, iw):
        im = im.resize((nw, nh), Image.BILINEAR)
    top = int(round((nh - out_hw[0]) / 2.0))
    left = int(round((nw - out_hw[1]) / 2.0))
    return _array(im.crop((left, top, left + out_hw[1], top + out_hw[0])), img_hwc.shape[2])
