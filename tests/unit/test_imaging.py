"""app.imaging.open_image_safely: bytes to an upright RGB image, or exactly one reason."""

from __future__ import annotations

import io
import random
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.imaging import ImageLimits, ImageRejected, open_image_safely, to_rgb
from app.schemas import RejectReason
from tests.fixtures.bad_inputs import BLUE, RED, CorpusCase, bilevel_png, halves, make_corpus, noise_image

COLOUR_TOLERANCE = 40  # JPEG round trips move colours a little; wrong handling moves them by ~255


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[CorpusCase]]:
    folder = tmp_path_factory.mktemp("imaging") / "corpus"
    return folder, make_corpus(folder)


def _outcome(data: bytes, limits: ImageLimits | None = None) -> str | RejectReason:
    try:
        image = open_image_safely(data, limits)
    except ImageRejected as exc:
        return exc.reason
    assert image.mode == "RGB"
    return "accepted"


def assert_pixels(image: Image.Image, case: CorpusCase) -> None:
    if case.size is not None:
        assert image.size == case.size, case.name
    for (x, y), expected in case.pixels:
        actual = image.getpixel((x, y))
        assert max(abs(a - e) for a, e in zip(actual, expected, strict=True)) <= COLOUR_TOLERANCE, (
            f"{case.name}: pixel {(x, y)} is {actual}, expected about {expected}"
        )


def _byte_cases(cases: list[CorpusCase]) -> list[CorpusCase]:
    """Corpus items whose outcome the bytes alone decide (no symlink, no stat-only size, no service rule)."""
    return [c for c in cases if c.in_folder and c.stage == "decode" and c.name != "sparse_200mb"]


def test_every_file_case_gets_its_outcome(corpus: tuple[Path, list[CorpusCase]]) -> None:
    folder, cases = corpus
    checked = _byte_cases(cases)
    assert len(checked) >= 20
    outcomes = {case.name: _outcome((folder / case.relpath).read_bytes()) for case in checked}
    assert outcomes == {case.name: case.decode_expected for case in checked}


def test_accepted_cases_have_the_expected_size_and_colours(corpus: tuple[Path, list[CorpusCase]]) -> None:
    folder, cases = corpus
    for case in _byte_cases(cases):
        if case.is_good:
            assert_pixels(open_image_safely((folder / case.relpath).read_bytes()), case)


def test_exif_rotated_jpeg_comes_out_upright(corpus: tuple[Path, list[CorpusCase]]) -> None:
    folder, _ = corpus
    data = (folder / "exif_rotated.jpg").read_bytes()
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.size == (32, 64)  # the file really is stored turned
        assert stored.getexif()[0x0112] == 6
    image = open_image_safely(data)
    assert image.size == (64, 32)
    left, right = image.getpixel((8, 16)), image.getpixel((56, 16))
    assert left[0] > 200 and left[2] < 60, f"left half should be red, is {left}"
    assert right[2] > 200 and right[0] < 60, f"right half should be blue, is {right}"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_undone(orientation: int) -> None:
    upright = halves((64, 32), RED, BLUE)
    # The stored pixels for tag N are the upright image under the inverse of the tag's transform.
    inverse = {
        1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270,
    }[orientation]
    stored = upright if inverse is None else upright.transpose(inverse)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif.tobytes())
    image = open_image_safely(buffer.getvalue())
    assert image.size == (64, 32)
    assert image.getpixel((8, 16)) == RED and image.getpixel((56, 16)) == BLUE


def test_limits_are_applied() -> None:
    png = io.BytesIO()
    noise_image(0, (100, 10)).save(png, "PNG")
    data = png.getvalue()
    assert _outcome(data) == "accepted"
    assert _outcome(data, ImageLimits(max_bytes=len(data) - 1)) is RejectReason.TOO_LARGE
    assert _outcome(data, ImageLimits(max_pixels=999)) is RejectReason.DECOMPRESSION_BOMB
    assert _outcome(data, ImageLimits(min_side=11)) is RejectReason.TOO_SMALL
    assert _outcome(data, ImageLimits(max_aspect=9.9)) is RejectReason.BAD_ASPECT


def test_a_bomb_is_refused_from_its_header_without_decoding() -> None:
    data = bilevel_png(8_000, 8_000)  # complete and valid: decoding it would allocate 64 Mpx
    assert len(data) < 20_000
    with pytest.raises(ImageRejected) as caught:
        open_image_safely(data)
    assert caught.value.reason is RejectReason.DECOMPRESSION_BOMB
    assert "8000x8000" in caught.value.detail
    assert _outcome(bilevel_png(1_000, 1_000)) == "accepted"  # the same construction, small, is fine


def test_cut_headers_are_truncated_or_corrupt_not_unknown_formats() -> None:
    jpeg, png = io.BytesIO(), io.BytesIO()
    noise_image(1, (64, 64)).save(jpeg, "JPEG")
    noise_image(1, (64, 64)).save(png, "PNG")
    assert _outcome(jpeg.getvalue()[:200]) is RejectReason.TRUNCATED  # Pillow: "Truncated File Read" at open
    assert _outcome(png.getvalue()[:40]) is RejectReason.CORRUPT  # PNG signature, header cut
    assert _outcome(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64) is RejectReason.CORRUPT
    assert _outcome(b"GIF89a garbage") is RejectReason.CORRUPT
    assert _outcome(b"plain text") is RejectReason.NOT_AN_IMAGE
    assert _outcome(b"") is RejectReason.EMPTY_FILE


def test_unsupported_formats_are_refused() -> None:
    pdf_like = io.BytesIO()
    Image.new("RGB", (8, 8)).save(pdf_like, "PDF")
    assert _outcome(pdf_like.getvalue()) in {RejectReason.NOT_AN_IMAGE, RejectReason.UNSUPPORTED}
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, "ICO")
    assert _outcome(ico.getvalue()) is RejectReason.UNSUPPORTED


@pytest.mark.parametrize(
    ("mode", "transparent"),
    [("L", 0), ("RGB", (0, 0, 0))],
    ids=["grey-tRNS", "rgb-tRNS"],
)
def test_colour_key_transparency_is_composited_on_white_like_alpha(mode: str, transparent: object) -> None:
    image = Image.new(mode, (16, 16), 0)
    image.paste(200 if mode == "L" else (0, 200, 0), (8, 0, 16, 16))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=transparent)
    decoded = open_image_safely(buffer.getvalue())
    assert decoded.getpixel((2, 8)) == (255, 255, 255)
    assert decoded.getpixel((12, 8)) == ((200, 200, 200) if mode == "L" else (0, 200, 0))


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16"])
def test_to_rgb_handles_every_mode(mode: str) -> None:
    source = noise_image(3, (8, 8))
    image = source.convert(mode) if mode not in {"I;16", "PA"} else source.convert("L").convert(mode)
    assert to_rgb(image).mode == "RGB"
    assert to_rgb(image).size == (8, 8)


def test_decoding_leaves_the_process_wide_warning_filters_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """warnings.catch_warnings() swaps global state and is not thread-safe; decode_rows runs in threads."""
    before = list(warnings.filters)
    filters_during_open: list[list[object]] = []
    real_open = Image.open

    def spying_open(*args: object, **kwargs: object) -> Image.Image:
        filters_during_open.append(list(warnings.filters))
        return real_open(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", spying_open)
    png = io.BytesIO()
    noise_image(2, (8, 8)).save(png, "PNG")
    open_image_safely(png.getvalue())
    assert filters_during_open == [before]
    assert list(warnings.filters) == before


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bombs_between_pillows_warning_and_error_thresholds_are_refused_from_threads() -> None:
    data = bilevel_png(12_000, 12_000, rows=1)  # 144 Mpx: Pillow only warns (89..179 Mpx); our 40 Mpx cap refuses
    reasons: list[RejectReason] = []

    def decode_many() -> None:
        for _ in range(10):
            try:
                open_image_safely(data)
            except ImageRejected as exc:
                reasons.append(exc.reason)

    threads = [threading.Thread(target=decode_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert reasons == [RejectReason.DECOMPRESSION_BOMB] * 40


def _seed_files() -> list[bytes]:
    image = noise_image(5, (24, 16))
    blobs = []
    for fmt, mode in [("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "P"), ("GIF", "P"), ("WEBP", "RGB"), ("BMP", "RGB"),
                      ("TIFF", "RGB"), ("TIFF", "CMYK"), ("PNG", "LA")]:
        buffer = io.BytesIO()
        image.convert(mode).save(buffer, fmt)
        blobs.append(buffer.getvalue())
    return blobs


SEEDS = _seed_files()


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on corrupt TIFF/EXIF tags
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_escape_as_another_exception(data: bytes) -> None:
    assert _outcome(data) in {"accepted", *RejectReason}


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(SEEDS))), st.integers(0, 2**32 - 1), st.integers(1, 8))
def test_mutated_real_images_never_escape_as_another_exception(seed_index: int, rng_seed: int, edits: int) -> None:
    rng = random.Random(rng_seed)
    data = bytearray(SEEDS[seed_index])
    for _ in range(edits):
        position = rng.randrange(len(data))
        if rng.random() < 0.7:
            data[position] = rng.randrange(256)
        else:
            del data[position : position + rng.randint(1, 64)]
        if not data:
            break
    outcome = _outcome(bytes(data))
    assert outcome in {"accepted", *RejectReason}


def test_sixteen_bit_is_rescaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (4, 1))
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "PNG")
    grey = np.asarray(open_image_safely(buffer.getvalue()))[0, :, 0].astype(int)
    assert grey[0] == 0 and grey[-1] == 255
    assert np.all(np.diff(grey) >= 0) and 120 <= grey[32] <= 140
