"""RandAugment as ALBEF and BLIP pre-train with it: their RandomAugment(n, m) on uint8 image
tensors, with the official magnitudes and geometry (data.create_transform puts it after the
crop)."""

import math

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

# their RandomAugment (dataset/randaugment.py):
# n operations drawn with replacement from these ten, each then applied with probability 0.5 at
# strength m of 10, the geometric ones with a random sign, bilinear, the uncovered area grey.
RANDAUG_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX",
               "ShearY", "TranslateX", "TranslateY", "Rotate")


def randaug_op(image, op, m, sign):
    """One RandAugment operation at strength m (of 10) on a uint8 image (3, H, W); sign (1 or -1)
    turns the geometric ones around. Magnitudes and geometry are those of the official cv2
    matrices: enhance factor 0.1 + 1.8 m / 10; shear 0.3 m / 10 about the top-left pixel;
    translation by m pixels; rotation by 3 m degrees about pixel (W / 2, H / 2)."""
    H, W = image.shape[-2:]
    bilinear, grey = InterpolationMode.BILINEAR, [128.0, 128.0, 128.0]
    if op == "AutoContrast":
        return TF.autocontrast(image)
    if op == "Equalize":
        return TF.equalize(image)
    if op == "Brightness":
        return TF.adjust_brightness(image, m / 10 * 1.8 + 0.1)
    if op == "Sharpness":
        return TF.adjust_sharpness(image, m / 10 * 1.8 + 0.1)
    if op in ("ShearX", "ShearY"):
        # cv2's x' = x + s y is torchvision's shear by -atan(s) about pixel (0, 0), whose
        # centre sits at (0.5, 0.5)
        angle = -math.degrees(math.atan(sign * m / 10 * 0.3))
        return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0,
                         shear=[angle, 0.0] if op == "ShearX" else [0.0, angle],
                         interpolation=bilinear, fill=grey, center=[0.5, 0.5])
    if op in ("TranslateX", "TranslateY"):
        # cv2's x' = x - offset, offset = m / 10 * 10 pixels
        shift = -sign * m
        return TF.affine(image, angle=0.0, translate=[shift, 0] if op == "TranslateX" else
                         [0, shift], scale=1.0, shear=[0.0, 0.0], interpolation=bilinear,
                         fill=grey)
    if op == "Rotate":
        return TF.rotate(image, sign * m / 10 * 30, interpolation=bilinear,
                         center=[W / 2 + 0.5, H / 2 + 0.5], fill=grey)
    return image


class RandomAugment:
    """ALBEF/BLIP's RandAugment on a uint8 image (3, H, W). Draws with torch's generator, which
    DataLoader seeds in every worker."""

    def __init__(self, n, m):
        self.n, self.m = n, m

    def __call__(self, image):
        for k in torch.randint(len(RANDAUG_OPS), (self.n,)).tolist():
            if torch.rand(()) > 0.5:
                continue
            sign = 1 if torch.rand(()) < 0.5 else -1
            image = randaug_op(image, RANDAUG_OPS[k], self.m, sign)
        return image
