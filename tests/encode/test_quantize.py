"""batchcap.encode.quantize: which photos calibrate int8, and the arrays made of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_images, write_shapes_dataset
from PIL import Image

from batchcap.config import Preprocess, from_dict
from batchcap.data.captions.factory import load_caption_dataset
from batchcap.data.preprocess import to_input_tensor
from batchcap.encode.quantize import CALIBRATION_PHOTOS, CalibrationError, calibration_arrays, calibration_photos
from batchcap.model.modelfile import read_metadata


def test_photos_of_a_folder_are_evenly_spaced_in_path_order(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "photos", 10)
    (tmp_path / "photos" / "readme.txt").write_text("not a picture")
    chosen = calibration_photos(tmp_path / "photos", count=4)
    assert chosen == [str(paths[i]) for i in (0, 2, 5, 7)]  # photos[i * 10 // 4]
    assert calibration_photos(str(tmp_path / "photos"), count=4) == chosen  # str or Path
    assert calibration_photos(tmp_path / "photos", count=10) == [str(p) for p in paths]


def test_fewer_photos_than_asked_for_are_all_used(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "photos", 3)
    assert calibration_photos(tmp_path / "photos") == [str(p) for p in paths]
    assert CALIBRATION_PHOTOS > 3


def test_photos_in_subfolders_count_and_sort_by_path(tmp_path: Path) -> None:
    b = write_images(tmp_path / "photos" / "b", 2, prefix="x")
    a = write_images(tmp_path / "photos" / "a", 2, fmt="PNG", prefix="y")
    assert calibration_photos(tmp_path / "photos") == [str(p) for p in a + b]


def test_a_caption_dataset_gives_its_train_photos_only(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    write_shapes_dataset(root, n_train=8, n_val=4)
    train = sorted(r.path for r in load_caption_dataset(root).splits["train"])
    assert len(train) == 8
    assert calibration_photos(root) == train
    assert calibration_photos(root, count=2) == [train[0], train[4]]
    Path(train[0]).unlink()  # a listed photo that is not there is skipped
    assert calibration_photos(root) == train[1:]


def test_nothing_to_calibrate_on_is_a_calibration_error(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="no such file or folder"):
        calibration_photos(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no training photos"):
        calibration_photos(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(CalibrationError, match="BATCHCAP_CALIBRATION_IMAGES"):
        calibration_photos(tmp_path / "text")


def test_arrays_are_what_the_encoder_sees(tmp_path: Path, tiny_model_path: Path) -> None:
    preprocess = from_dict(Preprocess, read_metadata(tiny_model_path)["preprocess"])  # the tiny model's own
    paths = write_images(tmp_path / "photos", 3, size=(90, 50))
    arrays = calibration_arrays([str(p) for p in paths], preprocess)
    assert len(arrays) == 3
    for array in arrays:
        assert array.dtype == np.uint8
        assert array.shape == (1, 3, preprocess.height, preprocess.width)
    assert not np.array_equal(arrays[0], arrays[1])  # each its own photo
    with Image.open(paths[2]) as img:
        expected = to_input_tensor(img.convert("RGB"), preprocess).numpy()
    assert np.array_equal(arrays[2][0], expected)  # in order, with the model's preprocessing


def test_arrays_follow_the_preprocessing_and_skip_unreadable_photos(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "photos", 2)
    broken = tmp_path / "photos" / "broken.jpg"
    broken.write_bytes(b"not a picture")
    crop = Preprocess(input_size=(3, 24, 32), resize="crop", interpolation="bilinear", crop_pct=0.9)
    arrays = calibration_arrays([str(paths[0]), str(broken), str(paths[1])], crop)
    assert [a.shape for a in arrays] == [(1, 3, 24, 32)] * 2
    with pytest.raises(CalibrationError, match="none of the calibration photos could be decoded"):
        calibration_arrays([str(broken)], crop)
    with pytest.raises(CalibrationError):
        calibration_arrays([], crop)
