"""batchcap.data.preprocess: timm's data config, resize targets, draft sizes and the uint8 input tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from batchcap.config import Preprocess
from batchcap.data.preprocess import draft_request, from_timm, resize_target, to_input_tensor

SQUASH = Preprocess(input_size=(3, 32, 48), resize="squash", interpolation="bilinear")
CROP = Preprocess(input_size=(3, 32, 32), resize="crop", interpolation="bicubic", crop_pct=0.8)


def test_from_timm_copies_timm_data_config() -> None:
    import timm
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(timm.create_model("test_efficientnet", num_classes=0))
    p = from_timm(config)
    assert p.input_size == tuple(config["input_size"])
    assert p.mean == pytest.approx(config["mean"]) and p.std == pytest.approx(config["std"])
    assert p.interpolation == config["interpolation"]
    assert p.crop_pct == pytest.approx(config["crop_pct"])
    assert p.resize == "crop"
    assert all(isinstance(v, int) for v in p.input_size)


def test_from_timm_squash_ignores_crop_pct_and_fills_defaults() -> None:
    config = {"input_size": [3, 299, 299], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875}
    p = from_timm(config, resize="squash")
    assert p == Preprocess(input_size=(3, 299, 299), resize="squash", interpolation="bicubic", crop_pct=1.0)
    assert from_timm(config).crop_pct == 0.875


@pytest.mark.parametrize("size", [(10, 10), (640, 480), (480, 640), (33, 1000)])
def test_squash_targets_the_input_size_whatever_the_aspect(size: tuple[int, int]) -> None:
    assert resize_target(*size, SQUASH) == (48, 32)


@pytest.mark.parametrize(("width", "height"), [(640, 480), (480, 640), (100, 100), (1000, 33), (33, 1000)])
def test_crop_scales_the_shorter_side_to_size_over_crop_pct_keeping_the_aspect(width: int, height: int) -> None:
    tw, th = resize_target(width, height, CROP)
    short = 40  # floor(32 / 0.8)
    assert min(tw, th) == short
    assert tw >= 32 and th >= 32  # the centre crop always fits
    assert tw / th == pytest.approx(width / height, rel=0.05)


def test_crop_on_a_non_square_input_uses_its_smaller_side() -> None:
    p = Preprocess(input_size=(3, 30, 60), resize="crop", crop_pct=1.0)
    assert resize_target(200, 100, p) == (60, 30)  # landscape: height becomes 30
    assert resize_target(100, 200, p) == (30, 60)  # portrait: width becomes 30


@pytest.mark.parametrize("cfg", [SQUASH, CROP], ids=["squash", "crop"])
@pytest.mark.parametrize("size", [(4000, 3000), (3000, 4000), (299, 299), (50, 40), (7000, 90)])
def test_draft_request_is_never_below_the_resize_target(cfg: Preprocess, size: tuple[int, int]) -> None:
    dw, dh = draft_request(*size, cfg)
    tw, th = resize_target(*size, cfg)
    assert dw >= 2 * tw and dh >= 2 * th


@pytest.mark.parametrize("cfg", [SQUASH, CROP], ids=["squash", "crop"])
@pytest.mark.parametrize("size", [(100, 60), (60, 100), (48, 32), (20, 20)])
def test_input_tensor_is_uint8_channels_first_at_the_input_size(cfg: Preprocess, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    t = to_input_tensor(img, cfg)
    assert t.dtype == torch.uint8
    assert tuple(t.shape) == (3, cfg.height, cfg.width)
    assert t.is_contiguous()


def test_input_tensor_keeps_orientation_and_channel_order() -> None:
    """Top-left red, top-right green, bottom half blue: each lands where it was, in its own channel."""
    array = np.zeros((32, 48, 3), dtype=np.uint8)
    array[:16, :24, 0] = 255
    array[:16, 24:, 1] = 255
    array[16:, :, 2] = 255
    t = to_input_tensor(Image.fromarray(array), SQUASH)  # already at the target size: no resize
    assert torch.equal(t, torch.from_numpy(array).permute(2, 0, 1))
    assert t[0, 0, 0] == 255 and t[1, 0, 0] == 0 and t[2, 0, 0] == 0
    assert t[1, 0, 47] == 255 and t[2, 31, 0] == 255


def test_squash_of_a_wide_picture_keeps_left_and_right() -> None:
    array = np.zeros((50, 200, 3), dtype=np.uint8)
    array[:, :100, 0] = 255  # left half red, right half black
    t = to_input_tensor(Image.fromarray(array), SQUASH)
    assert t[0, :, :20].min() == 255 and t[0, :, 28:].max() == 0  # squash keeps both halves


def test_crop_takes_the_centre() -> None:
    """A wide picture with red margins: the centre crop sees none of the margins."""
    array = np.zeros((100, 300, 3), dtype=np.uint8)
    array[:, :100, 0] = 255
    array[:, 200:, 0] = 255
    array[:, 100:200, 2] = 255
    cfg = Preprocess(input_size=(3, 32, 32), resize="crop", interpolation="nearest", crop_pct=1.0)
    t = to_input_tensor(Image.fromarray(array), cfg)
    assert t[0].max() == 0 and t[2].min() == 255


def test_crop_pct_below_one_crops_a_border() -> None:
    array = np.zeros((100, 100, 3), dtype=np.uint8)
    array[:5, :, 1] = 255  # a green line along the top
    cfg = Preprocess(input_size=(3, 80, 80), resize="crop", interpolation="nearest", crop_pct=0.8)
    t = to_input_tensor(Image.fromarray(array), cfg)  # resize to 100, crop the centre 80
    assert tuple(t.shape) == (3, 80, 80) and t[1].max() == 0


def test_only_rgb_pictures_are_accepted() -> None:
    for mode in ("L", "RGBA", "P"):
        with pytest.raises(ValueError, match="RGB"):
            to_input_tensor(Image.new(mode, (10, 10)), SQUASH)
