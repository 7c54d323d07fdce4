"""Datasets to FFCV .beton files, the FFCV loader for one DDP rank, batch augmentation and
MixUp/CutMix."""
from .augment import AUGMENTS, BatchAugment, flip_crop_rotate
from .mix import BatchMix, batch_mix
from .loader import load_split, make_loader, normalizer
from .prepare import prepare, read_meta
from .sources import DATASETS, DataError, load_source

__all__ = ["AUGMENTS", "BatchAugment", "BatchMix", "DATASETS", "DataError", "batch_mix",
           "flip_crop_rotate",
           "load_source", "load_split", "make_loader", "normalizer", "prepare", "read_meta"]
