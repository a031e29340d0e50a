"""runtime/core/image.py: preprocessing bit-identical to the reference (expand2square + HF CLIPImageProcessor), DICOM
rendering (rescale, window, MONOCHROME1, frames, colour), one-line UserErrors, atomic PNG writing.

DICOM inputs are the test files that ship inside the pydicom wheel (no network)."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from runtime.contract import files  # noqa: E402
from runtime.contract.errors import UserError  # noqa: E402
from runtime.core import clip_input, png  # noqa: E402
from runtime.core import image as rimg  # noqa: E402

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def ref_expand2square(pil_img, background_color):
    """Literal copy of the reference (DCD:HealthGPT/llava/demo/utils.py, stock LLaVA)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


@pytest.fixture(scope="module")
def hf_processor():
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
        do_normalize=True, image_mean=MEAN, image_std=STD, resample=3, do_convert_rgb=True)


def reference_pixels(img, processor):
    square = ref_expand2square(img, tuple(int(x * 255) for x in processor.image_mean))
    return processor.preprocess(square, return_tensors="np")["pixel_values"]


def dcm(name):
    return get_testdata_file(name)


def grey(img):
    a = np.asarray(img)
    assert a.ndim == 3 and a.shape[2] == 3 and (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()
    return a[..., 0]


def window(values, center, width):
    """Independent statement of the windowing rule: [c - w/2, c + w/2] -> [0, 255], round half to even."""
    lo = center - width / 2
    return np.clip(np.rint((values.astype(np.float64) - lo) / width * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- preprocessing vs HF

def test_constants():
    assert clip_input.FILL == (122, 116, 104)
    assert list(clip_input.CLIP_MEAN) == MEAN and list(clip_input.CLIP_STD) == STD
    assert clip_input.IMAGE_SIZE == 336 and int(clip_input.RESAMPLE) == 3


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_preprocess_matches_hf_on_scans(name, hf_processor):
    img = rimg.load_image(dcm(name))
    ours = clip_input.preprocess(img)
    ref = reference_pixels(img, hf_processor)
    assert ours.dtype == np.float32 and ours.shape == (1, 3, 336, 336) == ref.shape
    assert ref.dtype == np.float32
    assert np.array_equal(ours, ref), f"max abs diff {np.abs(ours - ref).max()}"


@pytest.mark.parametrize("size", [(97, 203), (203, 97), (1, 6), (1000, 517), (336, 336), (335, 337), (64, 64)])
def test_preprocess_matches_hf_on_synthetic(size, hf_processor):
    rng = np.random.default_rng(sum(size))
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    ours, ref = clip_input.preprocess(img), reference_pixels(img, hf_processor)
    assert np.array_equal(ours, ref), f"max abs diff {np.abs(ours - ref).max()}"


def test_expand2square_matches_reference():
    rng = np.random.default_rng(0)
    for w, h in [(5, 8), (8, 5), (4, 7), (7, 4), (6, 6), (1, 2)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours, ref = clip_input.expand2square(img), ref_expand2square(img, (122, 116, 104))
        assert ours.size == (max(w, h),) * 2 and np.array_equal(np.asarray(ours), np.asarray(ref))
    # floor-centred: width 4 in height 7 -> offset (7-4)//2 = 1 column of fill on the left, 2 on the right
    a = np.asarray(clip_input.expand2square(Image.new("RGB", (4, 7), (0, 0, 0))))
    assert (a[:, 0] == (122, 116, 104)).all() and (a[:, 1:5] == 0).all() and (a[:, 5:] == (122, 116, 104)).all()


def test_hand_computed_fill_pixel_of_real_scan():
    img = rimg.load_image(dcm("examples_overlay.dcm"))  # 484 x 300: landscape, padded above and below
    assert img.size == (484, 300)
    x = clip_input.preprocess(img)
    fill = np.array([122, 116, 104]) / 255
    by_hand = (fill - np.array(MEAN)) / np.array(STD)  # float64 hand computation
    for corner in [(0, 0), (0, 335), (335, 0), (335, 335)]:
        np.testing.assert_allclose(x[0, :, corner[0], corner[1]], by_hand, rtol=0, atol=1e-6)
    # and exactly what float32 arithmetic gives
    f32 = (np.array([122, 116, 104], np.float64) * (1 / 255)).astype(np.float32)
    exact = (f32 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    assert np.array_equal(x[0, :, 0, 0], exact)
    # the scan itself occupies rows 92..391 of the 484 canvas -> about rows 64..271 at 336
    assert not np.allclose(x[0, :, 168, 168], by_hand)


# ---------------------------------------------------------------- DICOM rendering

def test_ct_rescale_and_explicit_window():
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    assert intercept != 0
    hu = ds.pixel_array * slope + intercept
    got = grey(rimg.load_image(dcm("CT_small.dcm"), window=(40, 400)))
    assert np.array_equal(got, window(hu, 40, 400))
    assert not np.array_equal(got, window(ds.pixel_array.astype(float), 40, 400))  # rescale really matters


def test_ct_default_window_is_min_max():
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    assert "WindowCenter" not in ds
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo, hi = hu.min(), hu.max()
    got = grey(rimg.load_image(dcm("CT_small.dcm")))
    assert np.array_equal(got, window(hu, (lo + hi) / 2, hi - lo)) and got.min() == 0 and got.max() == 255


def test_mr_uses_file_window():
    ds = pydicom.dcmread(dcm("MR_small.dcm"))
    c, w = ds.WindowCenter, ds.WindowWidth
    c = float(c[0] if isinstance(c, pydicom.multival.MultiValue) else c)
    w = float(w[0] if isinstance(w, pydicom.multival.MultiValue) else w)
    got = grey(rimg.load_image(dcm("MR_small.dcm")))
    assert np.array_equal(got, window(ds.pixel_array, c, w))


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(dcm("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    normal = grey(rimg.load_image(dcm("MR_small.dcm")))
    assert np.array_equal(grey(rimg.load_image(path)), 255 - normal)


def test_enhanced_functional_groups(tmp_path):
    ds = pydicom.dcmread(dcm("MR_small.dcm"))
    del ds.WindowCenter, ds.WindowWidth
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([Dataset()])
    shared.PixelValueTransformationSequence[0].RescaleSlope = 2
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -100
    shared.FrameVOILUTSequence = Sequence([Dataset()])
    shared.FrameVOILUTSequence[0].WindowCenter = 1000
    shared.FrameVOILUTSequence[0].WindowWidth = 1500
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.save_as(tmp_path / "enh.dcm")
    got = grey(rimg.load_image(tmp_path / "enh.dcm"))
    assert np.array_equal(got, window(ds.pixel_array * 2.0 - 100, 1000, 1500))


def test_detected_by_magic_without_suffix(tmp_path):
    shutil.copy(dcm("CT_small.dcm"), tmp_path / "IM0001")
    assert np.array_equal(np.asarray(rimg.load_image(tmp_path / "IM0001")),
                          np.asarray(rimg.load_image(dcm("CT_small.dcm"))))


def test_multiframe_selection_and_range():
    path = dcm("rtdose.dcm")  # 15 frames of 10x10, 32-bit monochrome
    frames = pydicom.dcmread(path).pixel_array
    assert frames.shape[0] == 15
    for k in (0, 7, 14):
        f = frames[k].astype(np.float64)
        assert np.array_equal(grey(rimg.load_image(path, frame=k)),
                              window(f, (f.min() + f.max()) / 2, f.max() - f.min()))
    assert np.array_equal(np.asarray(rimg.load_image(path)), np.asarray(rimg.load_image(path, frame=0)))
    for bad in (15, -1):
        with pytest.raises(UserError, match=r"15 frame"):
            rimg.load_image(path, frame=bad)


def test_multiframe_rgb_and_ybr():
    path = dcm("SC_rgb_rle_2frame.dcm")
    frames = pydicom.dcmread(path).pixel_array
    assert np.array_equal(np.asarray(rimg.load_image(path, frame=1)), frames[1])
    with pytest.raises(UserError, match="2 frame"):
        rimg.load_image(path, frame=2)
    # YBR_FULL JPEG decodes to the same colours as its RGB sibling (within JPEG loss)
    rgb = np.asarray(rimg.load_image(dcm("SC_rgb_rle.dcm"))).astype(int)
    ybr = np.asarray(rimg.load_image(dcm("SC_rgb_dcmtk_+eb+cy+n1.dcm"))).astype(int)
    assert np.abs(rgb - ybr).mean() < 3
    with pytest.raises(UserError, match="monochrome"):
        rimg.load_image(dcm("SC_rgb_rle.dcm"), window=(100, 50))


def test_single_frame_rejects_other_frames():
    with pytest.raises(UserError, match="1 frame"):
        rimg.load_image(dcm("CT_small.dcm"), frame=1)


# ---------------------------------------------------------------- errors

def test_truncated_dicom():
    with pytest.raises(UserError, match="MR_truncated.dcm.*truncated"):
        rimg.load_image(dcm("MR_truncated.dcm"))


def test_dicom_without_pixel_data():
    with pytest.raises(UserError, match="rtplan.dcm.*no pixel data"):
        rimg.load_image(dcm("rtplan.dcm"))


def test_undecodable_transfer_syntax():
    name = "MR_small_jpeg_ls_lossless.dcm"  # JPEG-LS: needs pylibjpeg-libjpeg, pyjpegls or gdcm
    ts = pydicom.dcmread(dcm(name), stop_before_pixels=True).file_meta.TransferSyntaxUID
    if get_decoder(ts).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    with pytest.raises(UserError) as e:
        rimg.load_image(dcm(name))
    msg = str(e.value)
    assert name in msg and "JPEG-LS Lossless" in msg and "1.2.840.10008.1.2.4.80" in msg
    assert "pip install" in msg and "\n" not in msg


def test_decoder_present_but_failing_names_syntax():
    # Pillow handles JPEG Extended but not 12-bit samples: the error still names the syntax and the fix
    name = "JPEG-lossy.dcm"
    try:
        _ = pydicom.dcmread(dcm(name)).pixel_array
        pytest.skip("12-bit JPEG decodes here")
    except Exception:
        pass
    with pytest.raises(UserError, match=r"JPEG Extended.*1\.2\.840\.10008\.1\.2\.4\.51.*pip install"):
        rimg.load_image(dcm(name))


def test_text_file_renamed_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("not an image\n")
    with pytest.raises(UserError, match="notes.png"):
        rimg.load_image(p)


def test_truncated_png(tmp_path):
    png.save_png(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8), tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "b.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="b.png"):
        rimg.load_image(tmp_path / "b.png")


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        rimg.load_image(tmp_path / "nope.png")
    with pytest.raises(UserError, match="nope.dcm"):
        rimg.load_image(tmp_path / "nope.dcm")
    with pytest.raises(UserError):
        rimg.load_image(tmp_path)


def test_window_rejected_for_non_dicom_and_bad_width(tmp_path):
    png.save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "z.png")
    with pytest.raises(UserError, match="DICOM"):
        rimg.load_image(tmp_path / "z.png", window=(40, 400))
    with pytest.raises(UserError, match="width"):
        rimg.load_image(dcm("CT_small.dcm"), window=(40, 0))


# ---------------------------------------------------------------- PNG output

def test_save_png_round_trip_and_atomic(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    out = tmp_path / "sub" / "dir" / "out.png"
    png.save_png(arr, out)
    assert np.array_equal(np.asarray(Image.open(out)), arr)
    assert np.array_equal(np.asarray(rimg.load_image(out)), arr)
    png.save_png(arr[::-1], out)  # overwrite in place
    assert np.array_equal(np.asarray(Image.open(out)), arr[::-1])
    assert os.listdir(out.parent) == ["out.png"]  # no temp file left behind


def test_save_png_failure_leaves_target_and_no_temp(tmp_path, monkeypatch):
    arr = np.zeros((8, 8, 3), np.uint8)
    out = tmp_path / "keep.png"
    png.save_png(arr, out)
    before = out.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", boom)  # the one atomic writer save_png uses
    with pytest.raises(UserError, match="keep.png.*No space"):
        png.save_png(arr + 1, out)
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["keep.png"]


def test_save_png_rejects_other_suffix(tmp_path):
    with pytest.raises(UserError, match=r"\.png"):
        png.save_png(np.zeros((2, 2, 3), np.uint8), tmp_path / "x.jpg")
    assert not (tmp_path / "x.jpg").exists()


# ---------------------------------------------------------------- bytes (a server request's image)

def test_load_image_from_bytes_matches_the_file(tmp_path):
    for path, kw in ((dcm("CT_small.dcm"), {"window": (40, 400)}), (dcm("SC_rgb_rle_2frame.dcm"), {"frame": 1})):
        data = Path(path).read_bytes()
        assert np.array_equal(np.asarray(rimg.load_image(data, **kw)), np.asarray(rimg.load_image(path, **kw)))
    png.save_png(np.arange(48, dtype=np.uint8).reshape(4, 4, 3), tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    assert np.array_equal(np.asarray(rimg.load_image(data)), np.asarray(rimg.load_image(tmp_path / "a.png")))
    png.save_png(data, tmp_path / "b.png")  # PNG bytes are written as they are
    assert (tmp_path / "b.png").read_bytes() == data


def test_broken_bytes_name_the_image_by_size():
    data = Path(dcm("MR_truncated.dcm")).read_bytes()
    with pytest.raises(UserError, match=rf"^image \({len(data)} bytes\): corrupt or truncated DICOM"):
        rimg.load_image(data)
    with pytest.raises(UserError, match=r"^image \(5 bytes\): not an image file"):
        rimg.load_image(b"hello")
