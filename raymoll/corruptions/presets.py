"""Per-severity parameters of the reference generator, for three image sizes.

`PRESETS[preset][name]` is a tuple of five entries, severity 1 to 5, whose meaning is given in
docs/corruptions.md §2. "cifar" and "tinyimagenet" are the tables of make_cifar_c.py and
make_tinyimagenet_c.py; "imagenet" is the table of the PyPI package `imagecorruptions` 1.1.2.
Units are those of the reference, except two that scale with the image:

- elastic_transform is (alpha, sigma, affine jitter) as fractions of the image side (the
  reference multiplies by 32 or 64). For "imagenet", `imagecorruptions` draws the field from
  U(-0.005 side, 0.005 side), blurs it with sigma 0.01 side, multiplies by 250 a and applies no
  affine warp; that is alpha = 1.25 a side here, sigma 0.01, jitter 0.
- frost is (image weight, frost weight, photo scale); the photo is enlarged further where it
  would not cover the image, as `imagecorruptions` does.

zoom_blur entries are numpy.arange(start, stop, step) arguments, so that the number of zooms
matches the reference exactly (arange(1, 1.06, .01) has 7 values, not 6).
"""

_ZOOM_SMALL = ((1, 1.06, .01), (1, 1.11, .01), (1, 1.16, .01), (1, 1.21, .01), (1, 1.26, .01))

CIFAR = {
    "gaussian_noise": (.04, .06, .08, .09, .10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (.01, .02, .03, .05, .07),
    "speckle_noise": (.06, .10, .12, .16, .20),
    "gaussian_blur": (.4, .6, .7, .8, 1.0),
    "glass_blur": ((.05, 1, 1), (.25, 1, 1), (.4, 1, 1), (.25, 1, 2), (.4, 1, 2)),
    "defocus_blur": ((.3, .4), (.4, .5), (.5, .6), (1, .2), (1.5, .1)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    "zoom_blur": _ZOOM_SMALL,
    "snow": ((.1, .2, 1, .6, 8, 3, .95), (.1, .2, 1, .5, 10, 4, .9), (.15, .3, 1.75, .55, 10, 4, .9),
             (.25, .3, 2.25, .6, 12, 6, .85), (.3, .3, 1.25, .65, 14, 12, .8)),
    "frost": ((1, .2, .2), (1, .3, .2), (.9, .4, .2), (.85, .4, .2), (.75, .45, .2)),
    "fog": ((.2, 3), (.5, 3), (.75, 2.5), (1, 2), (1.5, 1.75)),
    "brightness": (.05, .1, .15, .2, .3),
    "contrast": (.75, .5, .4, .3, .15),
    "elastic_transform": ((0, 0, .08), (.05, .2, .07), (.08, .06, .06), (.1, .04, .05), (.1, .03, .03)),
    "pixelate": (.95, .9, .85, .75, .65),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "spatter": ((.62, .1, .7, .7, .5, 0), (.65, .1, .8, .7, .5, 0), (.65, .3, 1, .69, .5, 0),
                (.65, .1, .7, .69, .6, 1), (.65, .1, .5, .68, .6, 1)),
    "saturate": ((.3, 0), (.1, 0), (1.5, 0), (2, .1), (2.5, .2)),
}

TINYIMAGENET = {
    "gaussian_noise": (.04, .08, .12, .15, .18),
    "shot_noise": (250, 100, 50, 30, 15),
    "impulse_noise": (.01, .02, .05, .08, .14),
    "speckle_noise": (.15, .2, .25, .3, .35),
    "gaussian_blur": (.5, .75, 1, 1.25, 1.5),
    "glass_blur": ((.1, 1, 1), (.5, 1, 1), (.6, 1, 2), (.7, 2, 1), (.9, 2, 2)),
    "defocus_blur": ((.5, .6), (1, .1), (1.5, .1), (2.5, .01), (3, .1)),
    "motion_blur": ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)),
    "zoom_blur": _ZOOM_SMALL,
    "snow": ((.1, .2, 1, .6, 8, 3, .8), (.1, .2, 1, .5, 10, 4, .8), (.15, .3, 1.75, .55, 10, 4, .7),
             (.25, .3, 2.25, .6, 12, 6, .65), (.3, .3, 1.25, .65, 14, 12, .6)),
    "frost": ((1, .3, .3), (.9, .4, .3), (.8, .45, .3), (.75, .5, .3), (.7, .55, .3)),
    "fog": ((.4, 3), (.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)),
    "brightness": (.1, .2, .3, .4, .5),
    "contrast": (.4, .3, .2, .1, .05),
    "elastic_transform": ((0, 0, .08), (.05, .3, .06), (.1, .08, .06), (.1, .03, .03), (.16, .03, .02)),
    "pixelate": (.9, .8, .7, .6, .5),
    "jpeg_compression": (65, 58, 50, 40, 25),
    "spatter": ((.62, .1, .7, .7, .6, 0), (.65, .1, .8, .7, .6, 0), (.65, .3, 1, .69, .6, 0),
                (.65, .1, .7, .68, .6, 1), (.65, .1, .5, .67, .6, 1)),
    "saturate": ((.3, 0), (.1, 0), (2, 0), (5, .1), (30, .2)),
}

IMAGENET = {
    "gaussian_noise": (.08, .12, .18, .26, .38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (.03, .06, .09, .17, .27),
    "speckle_noise": (.15, .2, .35, .45, .6),
    "gaussian_blur": (1, 2, 3, 4, 6),
    "glass_blur": ((.7, 1, 2), (.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
    "defocus_blur": ((3, .1), (4, .5), (6, .5), (8, .5), (10, .5)),
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    "zoom_blur": ((1, 1.11, .01), (1, 1.16, .01), (1, 1.21, .02), (1, 1.26, .02), (1, 1.31, .03)),
    "snow": ((.1, .3, 3, .5, 10, 4, .8), (.2, .3, 2, .5, 12, 4, .7), (.55, .3, 4, .9, 12, 8, .7),
             (.55, .3, 4.5, .85, 12, 8, .65), (.55, .3, 2.5, .85, 12, 12, .55)),
    "frost": ((1, .4, 1.1), (.8, .6, 1.1), (.7, .7, 1.1), (.65, .7, 1.1), (.6, .75, 1.1)),
    "fog": ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)),
    "brightness": (.1, .2, .3, .4, .5),
    "contrast": (.4, .3, .2, .1, .05),
    "elastic_transform": ((.0625, .01, 0), (.08125, .01, 0), (.10625, .01, 0), (.125, .01, 0), (.15, .01, 0)),
    "pixelate": (.6, .5, .4, .3, .25),
    "jpeg_compression": (25, 18, 15, 10, 7),
    "spatter": ((.65, .3, 4, .69, .6, 0), (.65, .3, 3, .68, .6, 0), (.65, .3, 2, .68, .5, 0),
                (.65, .3, 1, .65, 1.5, 1), (.67, .4, 1, .65, 1.5, 1)),
    "saturate": ((.3, 0), (.1, 0), (2, 0), (5, .1), (20, .2)),
}

PRESETS = {"cifar": CIFAR, "tinyimagenet": TINYIMAGENET, "imagenet": IMAGENET}

# Tiny-ImageNet-C stored every corrupted image as a JPEG of this quality; corrupt() does too.
STORAGE_JPEG_QUALITY = {"tinyimagenet": 85}


def preset_for_size(side: int) -> str:
    """The preset whose native size (32, 64, 224) suits an image of this side: below 48 px
    "cifar", below 96 px "tinyimagenet", else "imagenet" (midpoints between 32, 64 and 128,
    where ImageNet-sized parameters start to make sense)."""
    if side < 48:
        return "cifar"
    if side < 96:
        return "tinyimagenet"
    return "imagenet"
