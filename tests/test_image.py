"""runtime/image.py: preprocessing bit-identical to the reference (expand2square + HF CLIPImageProcessor), DICOM
rendering (rescale, window, MONOCHROME1, frames, colour), one-line UserErrors, atomic PNG writing.

DICOM inputs are the test files that ship inside the pydicom wheel (no network)."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from runtime import files  # noqa: E402
from runtime import image as rimg  # noqa: E402
from runtime.errors import UserError  # noqa: E402

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
    assert rimg.FILL == (122, 116, 104)
    assert list(rimg.CLIP_MEAN) == MEAN and list(rimg.CLIP_STD) == STD
    assert rimg.IMAGE_SIZE == 336 and int(rimg.RESAMPLE) == 3


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_preprocess_matches_hf_on_scans(name, hf_processor):
    img = rimg.load_image(dcm(name))
    ours = rimg.preprocess(img)
    ref = reference_pixels(img, hf_processor)
    assert ours.dtype == np.float32 and ours.shape == (1, 3, 336, 336) == ref.shape
    assert ref.dtype == np.float32
    assert np.array_equal(ours, ref), f"max abs diff {np.abs(ours - ref).max()}"


@pytest.mark.parametrize("size", [(97, 203), (203, 97), (1, 6), (1000, 517), (336, 336), (335, 337), (64, 64)])
def test_preprocess_matches_hf_on_synthetic(size, hf_processor):
    rng = np.random.default_rng(sum(size))
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    ours, ref = rimg.preprocess(img), reference_pixels(img, hf_processor)
    assert np.array_equal(ours, ref), f"max abs diff {np.abs(ours - ref).max()}"


def test_expand2square_matches_reference():
    rng = np.random.default_rng(0)
    for w, h in [(5, 8), (8, 5), (4, 7), (7, 4), (6, 6), (1, 2)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours, ref = rimg.expand2square(img), ref_expand2square(img, (122, 116, 104))
        assert ours.size == (max(w, h),) * 2 and np.array_equal(np.asarray(ours), np.asarray(ref))
    # floor-centred: width 4 in height 7 -> offset (7-4)//2 = 1 column of fill on the left, 2 on the right
    a = np.asarray(rimg.expand2square(Image.new("RGB", (4, 7), (0, 0, 0))))
    assert (a[:, 0] == (122, 116, 104)).all() and (a[:, 1:5] == 0).all() and (a[:, 5:] == (122, 116, 104)).all()


def test_hand_computed_fill_pixel_of_real_scan():
    img = rimg.load_image(dcm("examples_overlay.dcm"))  # 484 x 300: landscape, padded above and below
    assert img.size == (484, 300)
    x = rimg.preprocess(img)
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
        pydicom.dcmread(dcm(name)).pixel_array
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
    rimg.save_png(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8), tmp_path / "a.png")
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
    rimg.save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "z.png")
    with pytest.raises(UserError, match="DICOM"):
        rimg.load_image(tmp_path / "z.png", window=(40, 400))
    with pytest.raises(UserError, match="width"):
        rimg.load_image(dcm("CT_small.dcm"), window=(40, 0))


# ---------------------------------------------------------------- PNG output

def test_save_png_round_trip_and_atomic(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    out = tmp_path / "sub" / "dir" / "out.png"
    rimg.save_png(arr, out)
    assert np.array_equal(np.asarray(Image.open(out)), arr)
    assert np.array_equal(np.asarray(rimg.load_image(out)), arr)
    rimg.save_png(arr[::-1], out)  # overwrite in place
    assert np.array_equal(np.asarray(Image.open(out)), arr[::-1])
    assert os.listdir(out.parent) == ["out.png"]  # no temp file left behind


def test_save_png_failure_leaves_target_and_no_temp(tmp_path, monkeypatch):
    arr = np.zeros((8, 8, 3), np.uint8)
    out = tmp_path / "keep.png"
    rimg.save_png(arr, out)
    before = out.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", boom)  # the one atomic writer save_png uses
    with pytest.raises(UserError, match="keep.png.*No space"):
        rimg.save_png(arr + 1, out)
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["keep.png"]


def test_save_png_rejects_other_suffix(tmp_path):
    with pytest.raises(UserError, match=r"\.png"):
        rimg.save_png(np.zeros((2, 2, 3), np.uint8), tmp_path / "x.jpg")
    assert not (tmp_path / "x.jpg").exists()


# ---------------------------------------------------------------- deep, flat and non-finite images

def ramp(dtype, lo, hi, shape=(48, 80)):
    return np.linspace(lo, hi, shape[0] * shape[1]).reshape(shape).astype(dtype)


@pytest.mark.parametrize("name,values", [
    ("grey16.png", ramp(np.uint16, 1000, 60000)),  # Pillow mode I;16
    ("int32.tif", ramp(np.int32, -70000, 2_000_000)),  # mode I
    ("float.tif", ramp(np.float32, -0.25, 0.75)),  # mode F
])
def test_deep_images_are_mapped_by_their_range(tmp_path, name, values):
    path = tmp_path / name
    Image.fromarray(values).save(path)
    got = grey(rimg.load_image(path))
    lo, hi = float(values.min()), float(values.max())
    assert np.array_equal(got, window(values, (lo + hi) / 2, hi - lo))
    assert got.min() == 0 and got.max() == 255 and 100 < got.mean() < 155
    with Image.open(path) as im:  # what Pillow's own convert makes of them: saturated or crushed
        crushed = np.asarray(im.convert("RGB"))
    assert crushed.mean() > 230 or crushed.mean() < 25


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "RGBA", "LA", "1"])
def test_8bit_images_are_read_as_pillow_converts_them(tmp_path, mode):
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).convert(mode)
    img.save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as im:
        want = np.asarray(im.convert("RGB"))
    assert np.array_equal(np.asarray(rimg.load_image(tmp_path / "x.png")), want)


def dicom_variant(tmp_path, name, **changes):
    ds = pydicom.dcmread(dcm(name))
    for key, value in changes.items():
        setattr(ds, key, value)
    path = tmp_path / f"{name}.variant.dcm"
    ds.save_as(path)
    return path


def float_dicom(tmp_path, values):
    """CT_small with its pixels replaced by 32-bit float data (FloatPixelData, no rescale)."""
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    for key in ("PixelData", "PixelRepresentation", "RescaleSlope", "RescaleIntercept"):
        delattr(ds, key)
    ds.BitsAllocated = ds.BitsStored = 32
    ds.HighBit = 31
    ds.Rows, ds.Columns = values.shape
    ds.FloatPixelData = values.astype(np.float32).tobytes()
    path = tmp_path / "float.dcm"
    ds.save_as(path)
    return path


def test_float_dicom_is_mapped_by_its_range(tmp_path):
    values = ramp(np.float32, -3.5, 12.0, (32, 32))
    assert np.array_equal(grey(rimg.load_image(float_dicom(tmp_path, values))), window(values, 4.25, 15.5))


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # pydicom on the RescaleSlope 'NaN' written below
def test_flat_and_non_finite_images_are_refused(tmp_path):
    def refused(path, *fragments, **kw):
        with pytest.raises(UserError) as e:
            rimg.load_image(path, **kw)
        for fragment in (str(path), *fragments):
            assert fragment in str(e.value)

    Image.fromarray(np.full((8, 9, 3), 77, np.uint8)).save(tmp_path / "flat.png")
    refused(tmp_path / "flat.png", "one flat colour", "(77, 77, 77)")
    Image.fromarray(np.full((8, 9), 40000, np.uint16)).save(tmp_path / "flat16.png")
    refused(tmp_path / "flat16.png", "flat", "40000")
    nan = ramp(np.float32, 0, 1)
    nan[3, 4] = np.nan
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    refused(tmp_path / "nan.tif", f"1 of {nan.size} pixel values are NaN or infinite")
    Image.fromarray(np.full((8, 9), np.inf, np.float32)).save(tmp_path / "inf.tif")
    refused(tmp_path / "inf.tif", "72 of 72")
    for slope in ("0", "NaN"):
        refused(dicom_variant(tmp_path, "CT_small.dcm", RescaleSlope=slope), "invalid RescaleSlope", slope)
    refused(float_dicom(tmp_path, np.full((16, 16), np.nan)), "256 of 256 pixel values are NaN")
    refused(float_dicom(tmp_path, np.full((16, 16), 7.5)), "flat", "7.5")
    refused(dcm("CT_small.dcm"), "one flat colour", "try a wider --window", window=(1e6, 1))


# ---------------------------------------------------------------- only regular files, broken DICOM, every DICOM

def test_only_regular_files_are_read(tmp_path):
    import threading

    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would block until a writer comes
    for path, kind in ((tmp_path / "pipe.png", "a named pipe (FIFO)"), (tmp_path, "a directory"),
                       (os.devnull, "a device")):
        errors = []
        reader = threading.Thread(target=lambda: errors.append(pytest.raises(UserError, rimg.load_image, path)),
                                  daemon=True)
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), f"load_image({path}) blocked"
        assert f"is {kind}: only regular image files are read" in str(errors[0].value)


def test_broken_dicom_variants_are_user_errors(tmp_path):
    deflated = open(dcm("image_dfl.dcm"), "rb").read()
    for cut in (len(deflated) // 3, len(deflated) * 2 // 3, len(deflated) * 9 // 10):
        (tmp_path / "dfl.dcm").write_bytes(deflated[:cut])
        with pytest.raises(UserError, match="not a readable DICOM file.*truncated"):  # zlib.error inside pydicom
            rimg.load_image(tmp_path / "dfl.dcm")
    for key in ("RedPaletteColorLookupTableData", "RedPaletteColorLookupTableDescriptor"):
        ds = pydicom.dcmread(dcm("examples_palette.dcm"))
        delattr(ds, key)
        ds.save_as(tmp_path / "palette.dcm")
        with pytest.raises(UserError, match="PALETTE COLOR image without a usable colour lookup table"):
            rimg.load_image(tmp_path / "palette.dcm")
    for name in ("CT_small.dcm", "examples_palette.dcm", "rtdose.dcm"):
        with pytest.raises(UserError, match="pixel data element is empty"):
            rimg.load_image(dicom_variant(tmp_path, name, PixelData=b""))


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's notes on the broken and truncated files
def test_every_shipped_dicom_loads_or_is_a_user_error(tmp_path):
    """Each file that ships with pydicom (no download), whole and cut at three points: an RGB image or a UserError."""
    import time

    from pydicom.data import get_testdata_files

    start, loaded, refused = time.monotonic(), 0, 0
    files = [f for f in get_testdata_files() if os.path.isfile(f) and os.path.getsize(f) < 4 << 20]
    assert len(files) > 150
    for f in files:
        data = open(f, "rb").read()
        variants = [f]
        for i, cut in enumerate((len(data) // 3, len(data) * 2 // 3, len(data) - 7)):
            variants.append(tmp_path / f"cut{i}{os.path.splitext(f)[1]}")
            variants[-1].write_bytes(data[:cut])
        for path in variants:
            try:
                img = rimg.load_image(path)
            except UserError as e:
                assert "\n" not in str(e), str(e)
                refused += 1
            else:
                assert img.mode == "RGB" and img.size[0] * img.size[1] > 1
                loaded += 1
    assert loaded > 70 and refused > 300
    assert time.monotonic() - start < 60
