"""What raymoll needs from FFCV's file format: the field layout and a structural check.

Importing ffcv sets torch's thread count to 1 (and building a Loader sets it to its worker
count); `keep_torch_threads` undoes that around both.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .sources import DataError


@contextmanager
def keep_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


with keep_torch_threads():
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader


def field_layout(write_mode: str, max_side: int | None, jpeg_quality: int) -> dict:
    """The .beton's fields as JSON (recorded in meta.json); write_mode is 'raw' or 'jpg'."""
    return {"image": {"type": "RGBImageField", "write_mode": write_mode,
                      "max_resolution": max_side, "jpeg_quality": jpeg_quality},
            "label": {"type": "IntField"}}


def make_fields(layout: dict) -> dict:
    image = layout["image"]
    return {"image": RGBImageField(write_mode=image["write_mode"],
                                   max_resolution=image["max_resolution"],
                                   jpeg_quality=image["jpeg_quality"]),
            "label": IntField()}


def check_beton(path: Path, num_samples: int | None = None) -> Reader:
    """Open `path` with FFCV's reader and check that it is a whole .beton of our layout.

    FFCV itself would fail later and obscurely (or read garbage) on a truncated file, so the
    allocation table is checked here: every sample's data must lie before the table, and the
    table must end exactly at the end of the file.
    """
    size = path.stat().st_size
    try:
        reader = Reader(str(path))
    except Exception as err:
        raise DataError(f"{path} is not a readable FFCV .beton file ({type(err).__name__}: "
                        f"{err}); re-create it with `raymoll prepare`.") from None
    table, table_start = reader.alloc_table, int(reader.header["alloc_table_ptr"])
    whole = (table_start + table.nbytes == size
             and len(np.unique(table["sample_id"])) == reader.num_samples
             and (len(table) == 0 or int((table["ptr"] + table["size"]).max()) <= table_start))
    if not whole:
        raise DataError(f"{path} is truncated or damaged: its header promises "
                        f"{reader.num_samples} samples and an allocation table at byte "
                        f"{table_start}, but the file has {size} bytes. Re-create it with "
                        f"`raymoll prepare`.")
    if set(reader.field_names) != {"image", "label"}:
        raise DataError(f"{path} has fields {reader.field_names}, expected image and label: it "
                        f"was not written by `raymoll prepare`.")
    if num_samples is not None and reader.num_samples != num_samples:
        raise DataError(f"{path} holds {reader.num_samples} samples but meta.json records "
                        f"{num_samples}: the folder mixes two preparations; re-run prepare.")
    return reader
