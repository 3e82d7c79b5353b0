"""epee.images: one class per function; DICOM datasets are built in memory, real files read from
../shared/data/dicom when it is there."""

from __future__ import annotations

import copy
import functools
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from epee import EncodedSample
from epee.images import (
    ImageSettings,
    dicom_to_array,
    load_image_file,
    preprocess,
    read_dicom,
    read_png,
    resize,
    to_channels,
    to_unit_range,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DICOM_DIR = REPO_ROOT.parent / "shared" / "data" / "dicom"
DICOM_FILES = sorted(p.name for p in DICOM_DIR.glob("*.dcm")) if DICOM_DIR.is_dir() else []
needs_dicom_dir = pytest.mark.skipif(
    not DICOM_FILES, reason=f"real DICOM files not found in {DICOM_DIR} (../shared/data/dicom beside the repo)"
)

SECRET = ("SECRET^PATIENT", "MRN-0042", "19700101")  # must never appear in an error message


def make_dataset(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    frames: int = 1,
    syntax=ExplicitVRLittleEndian,
    **elements,
) -> Dataset:
    """A minimal image dataset around `pixels`: (H, W), (H, W, 3), or (F, H, W) with frames=F."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = SECRET
    frame_shape = pixels.shape[1:] if frames > 1 else pixels.shape
    ds.Rows, ds.Columns = frame_shape[:2]
    ds.SamplesPerPixel = 3 if len(frame_shape) == 3 else 1
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(np.issubdtype(pixels.dtype, np.signedinteger))
    byte_order = "<" if syntax.is_little_endian else ">"
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(byte_order)).tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class TestImageSettings:
    def test_defaults(self):
        s = ImageSettings()
        assert (s.image_size, s.num_channels, s.mean, s.std, s.frame_policy) == (224, 1, (0.5,), (0.5,), "middle")

    def test_round_trip_and_lists_become_tuples(self):
        s = ImageSettings(image_size=32, num_channels=3, mean=[0.1, 0.2, 0.3], std=(1, 2, 3), frame_policy="all")
        assert s.mean == (0.1, 0.2, 0.3) and s.std == (1.0, 2.0, 3.0)
        assert ImageSettings.from_dict(s.to_dict()) == s

    def test_is_frozen(self):
        with pytest.raises(Exception):
            ImageSettings().image_size = 3  # type: ignore[misc]

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"image_size": 0}, r"image_size \(0\) must be an integer >= 1"),
            ({"image_size": 2.5}, r"image_size \(2.5\)"),
            ({"image_size": True}, r"image_size \(True\)"),
            ({"num_channels": 2}, r"num_channels \(2\) must be one of \(1, 3\)"),
            ({"num_channels": 3}, r"mean \(\(0.5,\)\) has 1 values but num_channels is 3"),
            ({"mean": (0.5, 0.5)}, r"mean .* has 2 values but num_channels is 1"),
            ({"std": (0.0,)}, r"std \(\(0.0,\)\) must be > 0"),
            ({"std": (-1.0,)}, r"std \(\(-1.0,\)\) must be > 0"),
            ({"mean": (float("nan"),)}, r"mean \(\(nan,\)\) must be finite"),
            ({"mean": "ab"}, r"mean \('ab'\) must be a sequence of numbers"),
            ({"frame_policy": "first"}, r"frame_policy \('first'\) must be one of \('middle', 'all'\)"),
        ],
    )
    def test_rejects_bad_values(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            ImageSettings(**kwargs)

    def test_from_dict_rejects_unknown_keys(self):
        with pytest.raises(ValueError, match=r"unknown image settings keys: \['size'\]"):
            ImageSettings.from_dict({"size": 3})


class TestToUnitRange:
    def test_uint8_divides_by_255(self):
        out = to_unit_range(np.array([[0, 51], [102, 255]], dtype=np.uint8))
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, [[0.0, 0.2], [0.4, 1.0]], rtol=1e-6)

    def test_uint8_keeps_the_8_bit_scale(self):
        np.testing.assert_allclose(to_unit_range(np.full((2, 2), 51, dtype=np.uint8)), 0.2, rtol=1e-6)

    def test_uint16_is_min_max_scaled(self):
        out = to_unit_range(np.array([100, 200, 300], dtype=np.uint16))
        np.testing.assert_allclose(out, [0.0, 0.5, 1.0])

    def test_signed_and_big_endian(self):
        np.testing.assert_allclose(to_unit_range(np.array([-1024, 0, 1024], dtype=">i2")), [0.0, 0.5, 1.0])

    def test_float_is_min_max_scaled(self):
        out = to_unit_range(np.array([-1.0, 0.0, 3.0]))
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, [0.0, 0.25, 1.0])

    @pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32, np.float64])
    def test_constant_image_becomes_zeros(self, dtype):
        out = to_unit_range(np.full((3, 4), 7, dtype=dtype))
        assert out.dtype == np.float32 and out.shape == (3, 4) and not out.any()

    def test_bool(self):
        np.testing.assert_array_equal(to_unit_range(np.array([True, False])), [1.0, 0.0])

    def test_does_not_modify_input(self):
        arr = np.array([1.0, 2.0, 3.0])
        to_unit_range(arr)
        np.testing.assert_array_equal(arr, [1.0, 2.0, 3.0])

    @pytest.mark.parametrize(
        "arr, match",
        [
            (np.array([0.0, np.nan]), "NaN or infinite"),
            (np.array([0.0, np.inf]), "NaN or infinite"),
            (np.zeros((0, 3)), "empty image"),
            (np.array(["a"]), "dtype <U1"),
        ],
    )
    def test_rejects(self, arr, match):
        with pytest.raises(ValueError, match=match):
            to_unit_range(arr)


class TestToChannels:
    def test_grey_to_grey(self):
        arr = np.array([[1, 2], [3, 4]], dtype=np.uint8)
        out = to_channels(arr, 1)
        assert out.shape == (1, 2, 2) and out.dtype == np.uint8
        np.testing.assert_array_equal(out[0], arr)
        assert not np.shares_memory(out, arr)

    def test_grey_with_channel_axis(self):
        arr = np.arange(6, dtype=np.float32).reshape(2, 3, 1)
        np.testing.assert_array_equal(to_channels(arr, 1), arr[..., 0][None])

    def test_grey_to_rgb_repeats(self):
        arr = np.array([[0.0, 0.5], [0.25, 1.0]], dtype=np.float32)
        out = to_channels(arr, 3)
        assert out.shape == (3, 2, 2)
        for c in range(3):
            np.testing.assert_array_equal(out[c], arr)

    def test_rgb_to_rgb_is_channel_first(self):
        arr = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
        out = to_channels(arr, 3)
        assert out.shape == (3, 2, 2) and out.flags.c_contiguous
        for c in range(3):
            np.testing.assert_array_equal(out[c], arr[..., c])

    def test_rgb_to_grey_is_bt601_luma(self):
        arr = np.array([[[1, 0, 0], [0, 1, 0]], [[0, 0, 1], [1, 1, 1]]], dtype=np.float32)  # (2, 2, 3)
        out = to_channels(arr, 1)
        assert out.shape == (1, 2, 2) and out.dtype == np.float32
        np.testing.assert_allclose(out[0], [[0.299, 0.587], [0.114, 1.0]], rtol=1e-6)

    def test_rgb_uint8_to_grey(self):
        out = to_channels(np.array([[[200, 100, 50]]], dtype=np.uint8), 1)
        np.testing.assert_allclose(out, [[[0.299 * 200 + 0.587 * 100 + 0.114 * 50]]], rtol=1e-6)

    def test_rgba_drops_alpha(self):
        rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], dtype=np.uint8)  # (1, 2, 4)
        np.testing.assert_array_equal(to_channels(rgba, 3), to_channels(rgba[..., :3], 3))
        np.testing.assert_allclose(to_channels(rgba, 1), to_channels(rgba[..., :3], 1))

    @pytest.mark.parametrize("shape", [(4,), (2, 2, 2), (2, 2, 5), (1, 2, 2, 3)])
    def test_rejects_shapes(self, shape):
        with pytest.raises(ValueError, match=r"expected an image of shape \(H, W\) or \(H, W, C\)"):
            to_channels(np.zeros(shape), 1)

    def test_rejects_channel_count(self):
        with pytest.raises(ValueError, match=r"num_channels \(2\)"):
            to_channels(np.zeros((2, 2)), 2)


class TestResize:
    @pytest.mark.parametrize("shape, size", [((1, 8, 6), 4), ((3, 2, 2), 5), ((3, 7, 3), 5), ((1, 4, 4), 4)])
    def test_shape_and_dtype(self, shape, size):
        out = resize(np.random.default_rng(0).random(shape), size)
        assert out.shape == (shape[0], size, size) and out.dtype == np.float32

    @pytest.mark.parametrize("shape, size", [((1, 9, 9), 4), ((3, 2, 3), 7)])
    def test_constant_image_stays_constant(self, shape, size):
        np.testing.assert_allclose(resize(np.full(shape, 0.3), size), 0.3, atol=1e-6)

    def test_same_size_is_an_identity_copy(self):
        arr = np.random.default_rng(1).random((2, 3, 3)).astype(np.float32)
        out = resize(arr, 3)
        np.testing.assert_array_equal(out, arr)
        assert not np.shares_memory(out, arr)

    def test_downscaling_is_antialiased(self):
        # Plain bilinear 8 -> 2 reads only pixels 1, 2, 5, 6 of each row, so a bright pixel at
        # (0, 0) would vanish; the antialiasing filter averages over it.
        arr = np.zeros((1, 8, 8), dtype=np.float32)
        arr[0, 0, 0] = 1.0
        out = resize(arr, 2)
        assert out[0, 0, 0] > 0.0 and out[0, 1, 1] == 0.0

    def test_matches_bilinear_upscaling(self):
        out = resize(np.array([[[0.0, 1.0]]]), 4)  # (1, 1, 2) -> (1, 4, 4); pixel centres at 1/8, 3/8, ...
        np.testing.assert_allclose(out[0, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)

    @pytest.mark.parametrize(
        "arr, size, match",
        [(np.zeros((4, 4)), 2, r"expected a non-empty \(C, H, W\) image"), (np.zeros((1, 4, 4)), 0, r"size \(0\)")],
    )
    def test_rejects(self, arr, size, match):
        with pytest.raises(ValueError, match=match):
            resize(arr, size)


class TestPreprocess:
    def test_grey_uint8_to_minus_one_one(self):
        arr = np.array([[0, 255, 0, 255]] * 4, dtype=np.uint8)
        out = preprocess(arr, ImageSettings(image_size=4))
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (1, 4, 4)
        torch.testing.assert_close(out[0, 0], torch.tensor([-1.0, 1.0, -1.0, 1.0]))

    def test_rgb_per_channel_normalisation(self):
        arr = np.zeros((6, 6, 3), dtype=np.uint8)
        arr[..., 0], arr[..., 2] = 255, 51  # R = 1.0, G = 0.0, B = 0.2 after /255
        settings = ImageSettings(image_size=3, num_channels=3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 1.0))
        out = preprocess(arr, settings)
        assert out.shape == (3, 3, 3)
        expected = torch.tensor([(1.0 - 0.1) / 0.5, (0.0 - 0.2) / 0.25, (0.2 - 0.3) / 1.0])
        torch.testing.assert_close(out.mean(dim=(1, 2)), expected)
        torch.testing.assert_close(out, expected[:, None, None].expand(3, 3, 3))

    def test_uint16_grey_to_rgb(self):
        arr = np.array([[0, 4095], [4095, 0]], dtype=np.uint16)
        out = preprocess(arr, ImageSettings(image_size=2, num_channels=3, mean=(0, 0, 0), std=(1, 1, 1)))
        torch.testing.assert_close(out, torch.tensor([[0.0, 1.0], [1.0, 0.0]]).expand(3, 2, 2))

    def test_feeds_an_encoded_sample_and_keeps_input(self):
        arr = np.random.default_rng(2).integers(0, 255, (10, 12), dtype=np.uint8)
        before = arr.copy()
        sample = EncodedSample(pixel_values=preprocess(arr, ImageSettings(image_size=8)))
        assert sample.pixel_values.shape == (1, 8, 8)
        np.testing.assert_array_equal(arr, before)


class TestReadPng:
    def test_grey_l(self, tmp_path):
        arr = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
        Image.fromarray(arr).save(tmp_path / "a.png")
        out = read_png(tmp_path / "a.png")
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, arr)

    def test_rgb_and_rgba(self, tmp_path):
        rgb = np.random.default_rng(3).integers(0, 256, (5, 4, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / "rgb.png")
        np.testing.assert_array_equal(read_png(str(tmp_path / "rgb.png")), rgb)
        rgba = np.concatenate([rgb, np.full((5, 4, 1), 128, dtype=np.uint8)], axis=-1)
        Image.fromarray(rgba).save(tmp_path / "rgba.png")
        np.testing.assert_array_equal(read_png(tmp_path / "rgba.png"), rgba)

    def test_16_bit_grey_is_kept(self, tmp_path):
        arr = (np.arange(12, dtype=np.uint16) * 5000).reshape(3, 4)
        Image.fromarray(arr).save(tmp_path / "a16.png")
        out = read_png(tmp_path / "a16.png")
        assert out.dtype == np.uint16
        np.testing.assert_array_equal(out, arr)

    def test_palette_becomes_rgb(self):
        img = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="L").convert("P")
        img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
        out = read_png(png_bytes(img))
        np.testing.assert_array_equal(out, [[[255, 0, 0], [0, 0, 255]], [[0, 0, 255], [255, 0, 0]]])

    def test_bytes_and_bilevel(self):
        img = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
        np.testing.assert_array_equal(read_png(png_bytes(img)), [[0, 255]])

    def test_rejects_non_png(self):
        with pytest.raises(ValueError, match="not a PNG image"):
            read_png(b"GIF89a not a png")

    def test_rejects_truncated_png(self):
        data = png_bytes(Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)))
        with pytest.raises(ValueError, match="corrupt PNG image"):
            read_png(data[:40])


class TestDicomToArray:
    def test_monochrome2_without_luts_keeps_values(self):
        arr = np.array([[0, 100], [200, 4095]], dtype=np.uint16)
        out = dicom_to_array(make_dataset(arr, bits_stored=12))
        assert out.dtype == np.uint16
        np.testing.assert_array_equal(out, arr)

    def test_rescale_slope_intercept(self):
        # PS3.3 C.11.1.1.2: output = stored * slope + intercept
        arr = np.array([[0, 10], [20, 30]], dtype=np.uint16)
        out = dicom_to_array(make_dataset(arr, RescaleSlope=2, RescaleIntercept=-100))
        np.testing.assert_array_equal(out, [[-100, -80], [-60, -40]])

    def test_rescale_then_window(self):
        # CT: 12 bits stored, HU = stored - 1024, soft-tissue window C=40 W=400 (PS3.3 C.11.2.1.2.1).
        hu = np.array([[-1024, -160], [40, 1000]])
        ds = make_dataset(
            (hu + 1024).astype(np.uint16), bits_stored=12,
            RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400,
        )
        y_min, y_max = -1024.0, 4095.0 - 1024.0  # the stored range after rescale
        c, w = 40 - 0.5, 400 - 1

        def window(x: float) -> float:
            if x <= c - w / 2:
                return y_min
            if x > c + w / 2:
                return y_max
            return ((x - c) / w + 0.5) * (y_max - y_min) + y_min

        expected = np.vectorize(window)(hu.astype(float))
        np.testing.assert_allclose(dicom_to_array(ds), expected)
        assert expected[0, 0] == y_min and expected[1, 1] == y_max

    def test_monochrome1_is_inverted_within_the_stored_range(self):
        # PS3.3 C.7.6.3.1.2: in MONOCHROME1 the minimum stored value is white.
        stored = np.array([[0, 100], [4000, 4095]], dtype=np.uint16)
        out = dicom_to_array(make_dataset(stored, photometric="MONOCHROME1", bits_stored=12))
        assert out.dtype == np.uint16
        np.testing.assert_array_equal(out, 4095 - stored)
        assert out.flat[stored.argmax()] == out.min() and out.flat[stored.argmin()] == out.max()

    def test_monochrome1_8_bit_and_windowed(self):
        stored = np.array([[0, 60], [200, 255]], dtype=np.uint8)
        np.testing.assert_array_equal(dicom_to_array(make_dataset(stored, photometric="MONOCHROME1")), 255 - stored)
        out = dicom_to_array(make_dataset(stored, photometric="MONOCHROME1", WindowCenter=128, WindowWidth=256))
        assert out.flat[stored.argmax()] == out.min() == 0.0 and out.flat[stored.argmin()] == out.max() == 255.0

    def test_middle_and_all_frames(self):
        stack = np.stack([np.full((2, 3), 10 * f, dtype=np.uint16) for f in range(3)])  # (3, 2, 3)
        ds = make_dataset(stack, frames=3)
        np.testing.assert_array_equal(dicom_to_array(ds), stack[1])
        np.testing.assert_array_equal(dicom_to_array(ds, "all"), stack)
        ds4 = make_dataset(np.concatenate([stack, stack[:1] + 7]), frames=4)
        np.testing.assert_array_equal(dicom_to_array(ds4), stack[2])  # frame n // 2

    def test_all_frames_of_a_single_frame_image_has_a_frame_axis(self):
        arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
        assert dicom_to_array(make_dataset(arr), "all").shape == (1, 2, 3)

    def test_enhanced_functional_groups_apply_per_frame(self):
        # Shared Pixel Value Transformation (PS3.3 C.7.6.16.2.9), per-frame override on frame 1.
        stack = np.full((3, 2, 2), 5, dtype=np.uint16)
        ds = make_dataset(stack, frames=3)

        def transform(intercept: float) -> Dataset:
            item = Dataset()
            item.PixelValueTransformationSequence = Sequence([Dataset()])
            item.PixelValueTransformationSequence[0].RescaleSlope = 1
            item.PixelValueTransformationSequence[0].RescaleIntercept = intercept
            item.PixelValueTransformationSequence[0].RescaleType = "US"
            return item

        ds.SharedFunctionalGroupsSequence = Sequence([transform(-100)])
        ds.PerFrameFunctionalGroupsSequence = Sequence([Dataset(), transform(1000), Dataset()])
        np.testing.assert_array_equal(dicom_to_array(ds), np.full((2, 2), 1005.0))
        np.testing.assert_array_equal(dicom_to_array(ds, "all")[:, 0, 0], [-95.0, 1005.0, -95.0])

    def test_ybr_full_becomes_rgb(self):
        rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [128, 128, 128]]], dtype=np.uint8)
        ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
        out = dicom_to_array(make_dataset(ybr, photometric="YBR_FULL"))
        assert out.shape == (2, 2, 3) and out.dtype == np.uint8
        np.testing.assert_allclose(out.astype(int), rgb.astype(int), atol=2)

    def test_rgb_planar_configuration_1(self):
        rgb = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
        ds = make_dataset(rgb, photometric="RGB")
        ds.PlanarConfiguration = 1
        ds.PixelData = np.moveaxis(rgb, -1, 0).tobytes()  # RRRR GGGG BBBB
        np.testing.assert_array_equal(dicom_to_array(ds), rgb)

    @pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ExplicitVRBigEndian])
    def test_palette_color(self, syntax):
        # PS3.3 C.7.6.3.1.5: 16-bit entries; big endian OW LUT Data must not come out byte-swapped.
        lut = {"Red": [65535, 0, 0, 4660], "Green": [0, 65535, 0, 4660], "Blue": [0, 0, 65535, 4660]}
        ds = make_dataset(np.array([[0, 1], [2, 3]], dtype=np.uint8), photometric="PALETTE COLOR", syntax=syntax)
        order = "<" if syntax.is_little_endian else ">"
        for colour, values in lut.items():
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [4, 0, 16])
            setattr(ds, f"{colour}PaletteColorLookupTableData", np.array(values, dtype=f"{order}u2").tobytes())
        out = dicom_to_array(ds)
        assert out.shape == (2, 2, 3)
        np.testing.assert_array_equal(out.reshape(4, 3), np.array(list(lut.values())).T)

    def test_does_not_modify_the_dataset(self):
        ds = make_dataset(
            np.array([[0, 4095]], dtype=np.uint16), photometric="MONOCHROME1", bits_stored=12,
            RescaleSlope="1.0", RescaleIntercept="-1024", WindowCenter="40", WindowWidth="400",
        )
        before = copy.deepcopy(ds)
        dicom_to_array(ds)
        dicom_to_array(ds, "all")
        assert ds == before and getattr(ds, "_pixel_array", None) is None

    def test_no_pixel_data(self):
        ds = make_dataset(np.zeros((2, 2), dtype=np.uint8))
        del ds.PixelData
        with pytest.raises(ValueError, match=r"no PixelData \(7FE0,0010\)") as info:
            dicom_to_array(ds)
        assert not any(s in str(info.value) for s in SECRET)

    @pytest.mark.parametrize(
        "change, match",
        [
            (lambda ds: delattr(ds, "Rows"), r"no Rows \(0028,0010\)"),
            (lambda ds: delattr(ds, "BitsStored"), r"no BitsStored \(0028,0101\)"),
            (lambda ds: delattr(ds.file_meta, "TransferSyntaxUID"), r"TransferSyntaxUID \(0002,0010\)"),
            (lambda ds: setattr(ds, "NumberOfFrames", 0), r"NumberOfFrames \(0028,0008\) must be >= 1"),
            (lambda ds: setattr(ds, "PixelData", ds.PixelData[:4]), r"cannot decode PixelData \(7FE0,0010\)"),
        ],
    )
    def test_invalid_input_names_the_tag(self, change, match):
        ds = make_dataset(np.zeros((4, 4), dtype=np.uint16))
        change(ds)
        with pytest.raises(ValueError, match=match) as info:
            dicom_to_array(ds)
        assert not any(s in str(info.value) for s in SECRET)

    def test_unsupported_photometric_interpretation(self):
        ds = make_dataset(np.zeros((2, 2, 3), dtype=np.uint8), photometric="HSV")
        with pytest.raises(NotImplementedError, match=r"PhotometricInterpretation \(0028,0004\) 'HSV'"):
            dicom_to_array(ds)

    def test_unsupported_transfer_syntax(self):
        ds = make_dataset(np.zeros((2, 2), dtype=np.uint8), syntax=pydicom.uid.MPEG2MPML)
        with pytest.raises(NotImplementedError, match=r"no pixel data decoder for TransferSyntaxUID"):
            dicom_to_array(ds)

    def test_rejects_frame_policy(self):
        with pytest.raises(ValueError, match=r"frame_policy \('last'\)"):
            dicom_to_array(make_dataset(np.zeros((2, 2), dtype=np.uint8)), "last")


class TestPresentationLut:
    """PS3.3 C.11.4: a MONOCHROME2 image's Presentation LUT is applied last, by pydicom."""

    def test_identity_leaves_the_pixels_and_inverse_inverts_monochrome2(self):
        pixels = np.array([[0, 100], [200, 250]], dtype=np.uint8)
        plain = dicom_to_array(make_dataset(pixels))
        np.testing.assert_array_equal(dicom_to_array(make_dataset(pixels, PresentationLUTShape="IDENTITY")), plain)
        np.testing.assert_array_equal(dicom_to_array(make_dataset(pixels, PresentationLUTShape="INVERSE")),
                                      plain.max() - plain)

    def test_monochrome1_is_inverted_once(self):
        pixels = np.array([[0, 100], [200, 255]], dtype=np.uint8)
        alone = dicom_to_array(make_dataset(pixels, photometric="MONOCHROME1"))
        stated = dicom_to_array(make_dataset(pixels, photometric="MONOCHROME1", PresentationLUTShape="INVERSE"))
        np.testing.assert_array_equal(stated, alone)
        np.testing.assert_array_equal(alone, 255 - pixels)

    def test_an_unknown_shape_is_logged_unquoted_and_not_applied(self, caplog):
        pixels = np.array([[0, 100]], dtype=np.uint8)
        with caplog.at_level("WARNING", logger="epee.images"):
            out = dicom_to_array(make_dataset(pixels, PresentationLUTShape="SECRETSHAPE"))
        np.testing.assert_array_equal(out, pixels)
        assert "Presentation LUT" in caplog.text and "SECRETSHAPE" not in caplog.text


class TestTruncatedPixelData:
    """A decode that fails on pixel data shorter than the header declares is ``truncated_pixel_data``:
    native data against pydicom's ``get_expected_length``, encapsulated data by its last fragment item."""

    def test_native_pixel_data_shorter_than_declared(self):
        ds = make_dataset(np.zeros((4, 4), dtype=np.uint16))
        ds.PixelData = ds.PixelData[:4]
        with pytest.raises(ValueError, match=r"shorter than the header declares") as info:
            dicom_to_array(ds)
        assert info.value.reason == "truncated_pixel_data"

    def test_encapsulated_fragment_cut_short(self):
        from pydicom.data import get_testdata_file

        ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
        ds.PixelData = ds.PixelData[:-100]
        with pytest.raises(ValueError, match=r"cannot decode PixelData \(7FE0,0010\)") as info:
            dicom_to_array(ds)
        assert info.value.reason == "truncated_pixel_data"

    def test_corrupt_but_complete_pixel_data_is_not_called_truncated(self):
        from pydicom.data import get_testdata_file

        ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
        value = bytearray(ds.PixelData)
        value[-2000:-1000] = b"\xff" * 1000  # inside the last fragment: every length still holds
        ds.PixelData = bytes(value)
        try:
            dicom_to_array(ds)
        except ValueError as exc:
            assert exc.reason == "decode_error"


class TestReadDicom:
    def test_file_and_file_like(self, tmp_path):
        stack = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
        ds = make_dataset(stack, frames=3, RescaleSlope=1, RescaleIntercept=-10)
        ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
        np.testing.assert_array_equal(read_dicom(tmp_path / "x.dcm"), stack[1] - 10.0)
        with open(tmp_path / "x.dcm", "rb") as f:
            np.testing.assert_array_equal(read_dicom(f, frame_policy="all"), stack - 10.0)

    def test_rejects_a_file_without_preamble(self, tmp_path):
        (tmp_path / "x.dcm").write_bytes(b"\x00" * 200)
        with pytest.raises(ValueError, match=r"not a DICOM Part 10 file"):
            read_dicom(tmp_path / "x.dcm")

    def test_rejects_frame_policy(self, tmp_path):
        with pytest.raises(ValueError, match="frame_policy"):
            read_dicom(tmp_path / "never-read.dcm", frame_policy="each")


class TestLoadImageFile:
    def test_dicom_by_content(self, tmp_path):
        stack = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
        make_dataset(stack, frames=2).save_as(tmp_path / "image.bin", enforce_file_format=True)
        np.testing.assert_array_equal(load_image_file(str(tmp_path / "image.bin")), stack[1])

    def test_dcm_suffix_without_preamble_goes_to_read_dicom(self, tmp_path):
        (tmp_path / "x.dcm").write_bytes(b"not dicom at all")
        with pytest.raises(ValueError, match="not a DICOM Part 10 file"):
            load_image_file(str(tmp_path / "x.dcm"))

    def test_png_by_content(self, tmp_path):
        arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
        (tmp_path / "scan.dat").write_bytes(png_bytes(Image.fromarray(arr)))
        np.testing.assert_array_equal(load_image_file(str(tmp_path / "scan.dat")), arr)

    def test_npy(self, tmp_path):
        arr = np.random.default_rng(4).random((3, 2)).astype(np.float32)
        np.save(tmp_path / "x.npy", arr)
        np.testing.assert_array_equal(load_image_file(str(tmp_path / "x.npy")), arr)

    def test_npy_never_unpickles(self, tmp_path):
        np.save(tmp_path / "x.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        with pytest.raises(ValueError, match="cannot read .npy image"):
            load_image_file(str(tmp_path / "x.npy"))

    def test_rejects_other_files(self, tmp_path):
        (tmp_path / "notes.txt").write_text("no image here")
        with pytest.raises(ValueError, match="unsupported image file type"):
            load_image_file(str(tmp_path / "notes.txt"))


@functools.lru_cache(maxsize=None)
def real_file_outcome(name: str) -> tuple[str, str]:
    """("decoded", shape/dtype) or ("raised", type: message) for one real file, computed once."""
    try:
        arr = read_dicom(DICOM_DIR / name)
    except (ValueError, NotImplementedError) as exc:
        return "raised", f"{type(exc).__name__}: {exc}"
    assert isinstance(arr, np.ndarray) and arr.ndim in (2, 3), (name, arr.shape)
    assert np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating), (name, arr.dtype)
    assert np.isfinite(arr).all(), name
    return "decoded", f"{arr.shape} {arr.dtype}"


@needs_dicom_dir
class TestRealDicomFiles:
    @pytest.mark.parametrize("name", DICOM_FILES)
    def test_decodes_or_raises_value_or_not_implemented(self, name):
        kind, _ = real_file_outcome(name)  # any other exception type fails the test
        assert kind in ("decoded", "raised")

    def test_most_files_decode(self):
        outcomes = {name: real_file_outcome(name) for name in DICOM_FILES}
        raised = {name: why for name, (kind, why) in outcomes.items() if kind == "raised"}
        assert len(outcomes) - len(raised) >= 45, raised

    def test_big_endian_palette_matches_little_endian(self):
        np.testing.assert_array_equal(
            read_dicom(DICOM_DIR / "OBXXXX1A_expb.dcm"), read_dicom(DICOM_DIR / "OBXXXX1A.dcm")
        )

    def test_ybr_full_matches_its_rgb_original(self):
        rgb = read_dicom(DICOM_DIR / "SC_rgb.dcm").astype(int)
        ybr = read_dicom(DICOM_DIR / "SC_ybr_full_uncompressed.dcm").astype(int)
        assert np.abs(rgb - ybr).max() <= 8

    @pytest.mark.parametrize(
        "name",
        ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_big_endian.dcm",
         "emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm"],
    )
    def test_every_lossless_encoding_gives_the_same_middle_frame(self, name):
        reference = read_dicom(DICOM_DIR / "emri_small.dcm", frame_policy="all")  # (10, 64, 64)
        assert reference.shape == (10, 64, 64)
        np.testing.assert_array_equal(read_dicom(DICOM_DIR / name), reference[5])

    def test_enhanced_ct_uses_its_functional_groups(self):
        # Shared groups: rescale intercept -1024 and window C=49 W=102, so values span the
        # rescaled 16-bit range [-1024, 64511] instead of raw stored values.
        out = read_dicom(DICOM_DIR / "eCT_Supplemental.dcm", frame_policy="all")
        assert out.shape == (2, 512, 512) and out.min() == -1024.0 and out.max() == 64511.0
