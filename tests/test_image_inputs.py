"""runtime/core/image.py on inputs that are not ordinary 8-bit images: deeper than 8 bits, flat or non-finite, not
regular files, broken DICOM, and every DICOM file that ships inside the pydicom wheel (issue 11)."""

import os

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from test_image import grey, window  # noqa: E402 - the independent statements of the rendering rules

from runtime.contract.errors import UserError  # noqa: E402
from runtime.core import image as rimg  # noqa: E402


def dcm(name):
    return get_testdata_file(name)


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


# ---------------------------------------------------------------- issue 24: one colour, decoding bombs

@pytest.mark.parametrize("pixels,rgb", [
    (np.full((8, 9, 3), (255, 0, 0), np.uint8), (255, 0, 0)),
    (np.full((5, 5, 3), (0, 90, 200), np.uint8), (0, 90, 200)),
    (np.array([[[13, 200, 7]]], np.uint8), (13, 200, 7)), (np.array([[250]], np.uint8), (250, 250, 250)),
], ids=["red", "blue", "1x1 colour", "1x1 grey"])
def test_any_one_colour_image_is_refused(tmp_path, pixels, rgb):
    Image.fromarray(pixels).save(tmp_path / "flat.png")
    with pytest.raises(UserError, match=rf"one flat colour \(every pixel is RGB \({rgb[0]}, {rgb[1]}, {rgb[2]}\)"):
        rimg.load_image(tmp_path / "flat.png")


@pytest.mark.parametrize("name,changes,match", [
    ("MR_small_RLE.dcm", {"Rows": 12000, "Columns": 12000},
     r"1 frame\(s\) of 12000 x 12000 x 1 sample\(s\), 144000000 values per frame, over the limit of 33554432"),
    ("CT_small.dcm", {"Rows": 6000, "Columns": 6000}, "36000000 values per frame"),
    ("rtdose.dcm", {"NumberOfFrames": 30_000_000}, r"30000000 frame\(s\) of 10 x 10 x 1 sample\(s\), 3000000000 "
     "values per file, over the limit of 2147483648"),
    ("SC_rgb_dcmtk_+eb+cr.dcm", {"Rows": 4000, "Columns": 4000}, r"4000 x 4000 x 3 sample\(s\)"),
])
def test_a_dicom_decoding_bomb_is_refused_before_decoding(tmp_path, name, changes, match):
    import time
    import tracemalloc

    path = dicom_variant(tmp_path, name, **changes)
    start = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=match):
            rimg.load_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20 and time.monotonic() - start < 10  # nothing was decoded
    assert rimg.load_image(dcm(name)).size  # the file as shipped still loads


def test_ask_refuses_a_decoding_bomb_in_one_line(m3_bundle, tmp_path):
    from test_cli import assert_user_error, run_cli

    bomb = dicom_variant(tmp_path, "MR_small_RLE.dcm", Rows=12000, Columns=12000)  # 4 kB declaring 288 MB
    proc = run_cli("ask", "--bundle", m3_bundle, "--image", bomb, "What is shown?", timeout=120)
    assert_user_error(proc, f"{bomb}: the DICOM file declares", "refused before decoding")
    assert sorted(p.name for p in tmp_path.iterdir()) == [bomb.name]
