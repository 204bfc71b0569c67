"""Predict page: widgets, a CLIP and a RECO prediction after an upload, clear errors for refused files,
nothing recomputed on a rerun."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from tests.ui.conftest import UI_APP, png_bytes, sample_image


def app() -> AppTest:
    return AppTest.from_file(str(UI_APP), default_timeout=60)


def markdown(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


def upload(at: AppTest, *files: tuple[str, bytes, str]) -> AppTest:
    at.file_uploader(key="predict_files").set_value(list(files))
    return at.run()


def test_widgets_and_random_weights_warning(ui_data: Path) -> None:
    at = app().run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Predict"
    assert any("RANDOM WEIGHTS" in w.value for w in at.warning)
    assert at.selectbox(key="predict_dataset").value == "clothing10"
    mode = at.selectbox(key="predict_mode")  # first and default: the checkpoint's validated mode
    assert mode.value == "checkpoint's choice" and mode.options[1:] == ["both", "image", "text"]
    assert at.number_input(key="predict_k").value == 4
    assert at.file_uploader(key="predict_files").accept_multiple_files
    assert any("Upload an image" in i.value for i in at.info)


def test_prediction_appears_after_upload(ui_data: Path) -> None:
    image = sample_image()
    at = upload(app().run(), (image.name, image.read_bytes(), "image/jpeg"))
    assert not at.exception and not at.error, [e.value for e in at.error]
    text = markdown(at)
    assert "#### CLIP top-5" in text and "#### RECO top-5 · mode both, k=4" in text
    assert text.count("— ") >= 10  # five ranked classes on each side, with probabilities
    assert "-badge[" in text  # RECO's rows marked against CLIP's ranks
    assert any("top-1" in s.value for s in [*at.info, *at.caption])
    assert not at.success  # a changed top-1 is stated neutrally, never as a success
    assert "Why RECO answered as it did" in text
    assert [t.label for t in at.tabs] == ["Text side: the top classes' prompts", "Image side: the image's neighbours"]
    # both sides: 3 classes x 4 prompt neighbours, and the image's own 4, each with the fusion's weight
    assert text.count("attention **") == 3 * 4 + 4
    assert text.count("retrieved these captions (text→text)") == 3
    assert [b.label for b in at.button].count("Open") == 16
    assert any("Nearest memory image: similarity" in c.value for c in [*at.caption, *at.warning])
    assert any("The memory's captions mention all 10 classes" in c.value for c in at.caption)


def test_text_mode_explains_through_the_class_prompts(ui_data: Path) -> None:
    image = sample_image()
    at = app().run()
    at.selectbox(key="predict_mode").set_value("text").run()
    at = upload(at, (image.name, image.read_bytes(), "image/jpeg"))
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert [t.label for t in at.tabs] == ["Text side: the top classes' prompts"]
    assert markdown(at).count("retrieved these captions (text→text)") == 3
    assert any("decides through the class prompts" in c.value for c in at.caption)


def test_class_sets_the_memory_does_not_hold_are_flagged(ui_data: Path) -> None:
    at = app().run()
    at.radio(key="predict_class_source").set_value("Labels typed in").run()
    at.text_area(key="predict_labels").set_value("hat, golf ball, garbage truck, dress").run()
    flagged = [w.value for w in at.warning if "classes" in w.value and "RANDOM" not in w.value]
    assert flagged and "holds 2 of these 4 classes" in flagged[0] and "golf ball, garbage truck" in flagged[0]


def test_bad_files_get_clear_errors_and_the_good_one_a_prediction(ui_data: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECO_MAX_IMAGE_BYTES", "20000")
    monkeypatch.setenv("RECO_MAX_IMAGE_PIXELS", "250000")
    image = sample_image()
    at = upload(app().run(),
                ("notes.txt", b"hello", "text/plain"),
                ("fake.png", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/png"),
                ("huge.png", png_bytes((600, 600)), "image/png"),
                ("heavy.bmp", b"BM" + bytes(30_000), "image/bmp"),
                (image.name, image.read_bytes(), "image/jpeg"))
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 4, errors
    assert "unsupported file type `.txt`" in errors[0]
    assert "not an image" in errors[1] and "`not_an_image`" in errors[1]
    assert "too many pixels" in errors[2] and "`decompression_bomb`" in errors[2]
    assert "too large" in errors[3] and "`too_large`" in errors[3]
    assert "#### RECO top-5" in markdown(at)


def test_nothing_is_recomputed_on_a_rerun(ui_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import app.encoder as encoders
    from ui import backend

    calls = {"predict": 0, "encoder": 0}
    predict, create = backend.ServingBackend.predict, encoders.create_encoder

    def counting_predict(self: backend.ServingBackend, *args: Any, **kwargs: Any) -> Any:
        calls["predict"] += 1
        return predict(self, *args, **kwargs)

    def counting_create(*args: Any, **kwargs: Any) -> Any:
        calls["encoder"] += 1
        return create(*args, **kwargs)

    monkeypatch.setattr(backend.ServingBackend, "predict", counting_predict)
    monkeypatch.setattr("ui.state.create_encoder", counting_create)
    image = sample_image()
    at = upload(app().run(), (image.name, image.read_bytes(), "image/jpeg"))
    at.radio(key="predict_class_source").set_value("Dataset classes").run()
    at.run()
    assert calls == {"predict": 1, "encoder": 1}
    at.selectbox(key="predict_mode").set_value("image").run()  # a new question is computed once more
    assert calls["predict"] == 2 and "#### RECO top-5 · mode image" in markdown(at)


def test_typed_labels(ui_data: Path) -> None:
    at = app().run()
    at.radio(key="predict_class_source").set_value("Labels typed in").run()
    at.text_area(key="predict_labels").set_value("red thing, blue thing\nred thing").run()
    at = upload(at, ("red.png", png_bytes(), "image/png"))
    text = markdown(at)
    assert "**red thing**" in text and "**blue thing**" in text and "3." not in text


def test_empty_memory_still_gives_clip_and_says_why_not_reco(empty_ui_data: Path) -> None:
    at = upload(app().run(), ("red.png", png_bytes(), "image/png"))
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "#### CLIP top-5" in markdown(at)
    assert any("No RECO answer" in w.value and "ingest" in w.value for w in at.warning)
