"""The training feature cache: chunked, resumable, keyed by what made the features."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from batchcap.config import Preprocess, RuntimeConfig
from batchcap.features import FeatureCache, FeatureKey
from conftest import write_images

PRE = Preprocess(input_size=(3, 32, 32), resize="squash", interpolation="bilinear")
RUNTIME = RuntimeConfig(precision="fp32", batch_size=2, workers=0, channels_last=False)


def channel_means(images: torch.Tensor) -> torch.Tensor:
    """A stand-in encoder: one 'region' holding the mean of each colour channel."""
    return images.float().mean(dim=(2, 3))[:, None, :]  # (B, 1, 3)


def test_extract_resumes_and_load_returns_rows_in_the_asked_order(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "p", 5)
    (tmp_path / "p" / "bad.jpg").write_text("not a picture")
    items = [(p.name, str(p)) for p in paths] + [("bad.jpg", str(tmp_path / "p" / "bad.jpg"))]
    cache = FeatureCache(tmp_path / "cache", FeatureKey("x", "w", PRE, True, "fp32"))
    calls = []

    def encoder(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return channel_means(images)

    failures = cache.extract(items[:3], encoder, RUNTIME, chunk_size=2)
    assert failures == {} and len(cache.chunks()) == 2
    failures = cache.extract(items, encoder, RUNTIME, chunk_size=2)  # only the rest is computed
    assert sum(calls) == 5 and set(failures) == {"bad.jpg"}
    assert failures["bad.jpg"].startswith("unsupported:")  # the run's decode stage named it
    assert cache.cached_ids() == {p.name for p in paths}
    wanted = [paths[4].name, paths[0].name, paths[2].name]
    ids, feats = cache.load(wanted)
    assert ids == wanted and feats.shape == (3, 1, 3) and feats.dtype == torch.float16
    _, everything = cache.load()
    order = [i for chunk in cache.chunks() for i in cache._chunk_ids(chunk)]
    for row, image_id in enumerate(wanted):
        assert torch.equal(feats[row], everything[order.index(image_id)])


def test_a_change_in_what_makes_features_gives_a_new_cache(tmp_path: Path) -> None:
    key = FeatureKey("legacy_xception", "abc", PRE, True, "bf16")
    variants = [dataclasses.replace(key, weights="abd"), dataclasses.replace(key, precision="fp32"),
                dataclasses.replace(key, view="hflip"),
                dataclasses.replace(key, preprocess=dataclasses.replace(PRE, resize="crop"))]
    digests = {key.digest()} | {v.digest() for v in variants}
    assert len(digests) == 5
    assert FeatureCache(tmp_path, key).dir != FeatureCache(tmp_path, variants[0]).dir
