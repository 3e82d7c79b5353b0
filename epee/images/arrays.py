"""Generic pixel functions: one image's raw array to the model's normalised (C, H, W) tensor.

    raw pixels -> to_unit_range -> to_channels -> resize -> (x - mean) / std -> tensor (C, H, W)

Flat functions in the style of pydicom's ``pixels/processing.py``; inputs are never modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: the DICOM decoder process never needs it
    import torch

FRAME_POLICIES = ("middle", "all")
CHANNEL_COUNTS = (1, 3)
# ITU-R BT.601 luma weights for R, G, B (the weights Pillow's convert("L") uses too).
BT601_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ImageSettings:
    """How raw pixels become the model's ``pixel_values``; stored beside the model."""

    image_size: int = 224  # square side the model takes; ViT cost grows with (size / patch)^2 tokens
    num_channels: int = 1  # 1 grey (X-ray, CT, MR) or 3 RGB (ultrasound, photos, RGB-pretrained ViTs)
    mean: tuple[float, ...] = (0.5,)  # per channel, subtracted after scaling pixels to [0, 1]
    std: tuple[float, ...] = (0.5,)  # per channel, > 0; (0.5,) with mean (0.5,) maps [0, 1] to [-1, 1]
    frame_policy: str = "middle"  # multi-frame DICOM: "middle" frame only, or "all" frames as a stack

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size ({self.image_size!r}) must be an integer >= 1")
        if isinstance(self.num_channels, bool) or self.num_channels not in CHANNEL_COUNTS:
            raise ValueError(f"num_channels ({self.num_channels!r}) must be one of {CHANNEL_COUNTS}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            try:
                values = tuple(float(v) for v in values)
            except (TypeError, ValueError):
                raise ValueError(f"{name} ({values!r}) must be a sequence of numbers, one per channel") from None
            if len(values) != self.num_channels:
                raise ValueError(
                    f"{name} ({values}) has {len(values)} values but num_channels is {self.num_channels}: "
                    "give one value per channel"
                )
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name} ({values}) must be finite")
            object.__setattr__(self, name, values)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std ({self.std}) must be > 0 in every channel")
        if self.frame_policy not in FRAME_POLICIES:
            raise ValueError(f"frame_policy ({self.frame_policy!r}) must be one of {FRAME_POLICIES}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "num_channels": self.num_channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "frame_policy": self.frame_policy,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageSettings":
        known = {"image_size", "num_channels", "mean", "std", "frame_policy"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown image settings keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if k in ("mean", "std") else v for k, v in data.items()})

def to_unit_range(arr: np.ndarray) -> np.ndarray:
    """Return `arr` as ``float32`` scaled to [0, 1].

    Parameters
    ----------
    arr : numpy.ndarray
        An image of any shape with a boolean, integer or floating-point dtype.

    Returns
    -------
    numpy.ndarray
        A new ``float32`` array of the same shape:

        * ``uint8``: divided by 255, so the 8-bit scale is kept (a dark photo stays dark).
        * ``bool``: False -> 0, True -> 1.
        * every other integer type and every float type: min-max scaled over the whole image
          (all channels together, so colour balance is kept), because their nominal range
          (12-bit CT in 16 bits, Hounsfield units, parametric maps) says little about the values
          actually present. A constant image becomes all zeros.

    Raises
    ------
    ValueError
        If `arr` is empty, not numeric, or holds NaN or infinite values.
    """
    arr = np.asarray(arr)
    if arr.size == 0:
        raise ValueError(f"cannot scale an empty image (shape {arr.shape})")
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"cannot scale an image of dtype {arr.dtype}: expected integers or floats")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    values = arr.astype(np.float64)  # exact for every integer up to 2**53, and native byte order
    if not np.isfinite(values).all():
        raise ValueError("image holds NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        return np.zeros(arr.shape, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def to_channels(arr: np.ndarray, num_channels: int) -> np.ndarray:
    """Return an (H, W) or (H, W, C) image as a new (num_channels, H, W) array.

    Parameters
    ----------
    arr : numpy.ndarray
        (H, W) grey, or (H, W, C) with C = 1 (grey), 3 (RGB) or 4 (RGBA).
    num_channels : int
        1 for grey or 3 for RGB.

    Returns
    -------
    numpy.ndarray
        Channel-first copy. Grey to RGB repeats the grey plane; RGB to grey is the ITU-R BT.601
        luma ``0.299 R + 0.587 G + 0.114 B`` (a float result); RGBA drops alpha first. Otherwise
        the dtype is kept.

    Raises
    ------
    ValueError
        If `num_channels` is not 1 or 3, or `arr` is not (H, W) or (H, W, 1|3|4).
    """
    if isinstance(num_channels, bool) or num_channels not in CHANNEL_COUNTS:
        raise ValueError(f"num_channels ({num_channels!r}) must be one of {CHANNEL_COUNTS}")
    arr = np.asarray(arr)
    if arr.ndim == 2:
        grey = arr[np.newaxis]  # (1, H, W)
    elif arr.ndim == 3 and arr.shape[-1] == 1:
        grey = np.moveaxis(arr, -1, 0)  # (1, H, W)
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = np.moveaxis(arr[..., :3], -1, 0)  # (3, H, W); alpha dropped
        if num_channels == 3:
            return np.array(rgb, copy=True, order="C")
        weights = np.asarray(BT601_LUMA, dtype=np.result_type(arr.dtype, np.float32))
        return np.tensordot(weights, rgb, axes=1)[np.newaxis]  # (1, H, W)
    else:
        raise ValueError(
            f"expected an image of shape (H, W) or (H, W, C) with C in (1, 3, 4), got shape {arr.shape}"
        )
    if num_channels == 3:
        return np.repeat(grey, 3, axis=0)  # (3, H, W), a new array
    return np.array(grey, copy=True, order="C")


def resize(arr_chw: np.ndarray, size: int) -> np.ndarray:
    """Return a (C, H, W) image bilinearly resized to a new ``float32`` (C, size, size) array.

    Uses :func:`torch.nn.functional.interpolate` with ``align_corners=False`` (pixel centres, as
    Pillow and OpenCV resample) and ``antialias=True`` whenever either side shrinks, so that
    downscaling averages over the pixels it drops instead of aliasing. Aspect ratio is not kept:
    the image is stretched to a square, as ViT image processors do.

    Raises
    ------
    ValueError
        If `arr_chw` is not 3-D or `size` is not an integer >= 1.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size ({size!r}) must be an integer >= 1")
    arr_chw = np.asarray(arr_chw)
    if arr_chw.ndim != 3 or 0 in arr_chw.shape:
        raise ValueError(f"expected a non-empty (C, H, W) image, got shape {arr_chw.shape}")
    import torch
    import torch.nn.functional as F

    _, h, w = arr_chw.shape
    x = torch.from_numpy(np.array(arr_chw, dtype=np.float32, order="C"))  # a copy, never a view of the input
    if (h, w) == (size, size):
        return x.numpy()
    out = F.interpolate(
        x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=size < max(h, w)
    )  # (1, C, size, size)
    return out[0].numpy()


def preprocess(arr: np.ndarray, settings: ImageSettings) -> torch.Tensor:
    """Turn one image's raw pixels into the model's ``pixel_values``.

    raw pixels -> :func:`to_unit_range` -> :func:`to_channels` -> :func:`resize` ->
    ``(x - mean) / std`` per channel.

    Parameters
    ----------
    arr : numpy.ndarray
        One image, (H, W) or (H, W, C) as returned by :func:`load_image_file`. A frame stack from
        ``frame_policy="all"`` must be preprocessed one frame at a time.
    settings : ImageSettings
        Target size, channels and normalisation.

    Returns
    -------
    torch.Tensor
        ``float32`` (num_channels, image_size, image_size), ready for
        ``EncodedSample(pixel_values=...)``.
    """
    unit = to_unit_range(arr)
    chw = to_channels(unit, settings.num_channels)  # (C, H, W) in [0, 1]
    sized = resize(chw, settings.image_size)  # (C, S, S) float32
    mean = np.asarray(settings.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(settings.std, dtype=np.float32)[:, None, None]
    import torch

    return torch.from_numpy((sized - mean) / std)
