"""The training feature cache: encoder features computed once, reused across epochs and runs.

A cache lives in ``<cache_dir>/<key>/`` where ``key`` hashes everything that changes the
features: encoder name, weights identity, resolved preprocessing, spatial or pooled,
precision and the augmentation view. Any change gives a new key -- an old cache is
never silently reused. Features are written in chunks (``chunk-NNNNN.safetensors``,
fp16, ids in the metadata), each one atomically, so an interrupted extraction resumes
where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors.torch import load_file

from batchcap.config import ImagePolicy, Preprocess, RuntimeConfig, to_dict
from batchcap.datasets import CaptionRecord, read_image_bytes
from batchcap.decode import decode_bytes, decode_file
from batchcap.modelfile import atomic_save_safetensors


@dataclass(frozen=True)
class FeatureKey:
    """What determines a feature tensor; its hash names the cache folder."""

    encoder: str
    weights: str  # sha256 of the weights file, or "pretrained:<tag>"
    preprocess: Preprocess
    spatial: bool
    precision: str
    view: str = "plain"  # "plain" | "hflip"

    def digest(self) -> str:
        doc = {"encoder": self.encoder, "weights": self.weights, "preprocess": to_dict(self.preprocess),
               "spatial": self.spatial, "precision": self.precision, "view": self.view}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


class ImageFiles(torch.utils.data.Dataset):
    """Pictures for training, decoded by the same stage as ``batchcap run`` (:mod:`batchcap.decode`).

    Sharing the decode policy (EXIF, modes, alpha, draft, limits) and the preprocessing
    is what keeps training features and captioning features from drifting apart. A
    failure yields its status and message instead of a tensor.
    """

    def __init__(self, items: Sequence[tuple[str, str | CaptionRecord]], preprocess: Preprocess,
                 hflip: bool, random_flip: bool = False, policy: ImagePolicy = ImagePolicy()) -> None:
        self.items = list(items)
        self.preprocess = preprocess
        self.hflip = hflip
        self.random_flip = random_flip  # training augmentation: mirror half of the pictures
        self.policy = policy

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str | None]:
        image_id, where = self.items[index]
        if isinstance(where, str) or where.path is not None:
            decoded = decode_file(where if isinstance(where, str) else where.path, self.preprocess, self.policy)
        else:
            try:
                data = read_image_bytes(where)
            except OSError as exc:
                return image_id, None, f"unreadable: {exc}"
            decoded = decode_bytes(data, self.preprocess, self.policy)
        if decoded.tensor is None:
            return image_id, None, f"{decoded.status}: {decoded.error}"
        tensor = decoded.tensor
        # Mirroring after the resize equals mirroring before it: squash and centre crop are symmetric.
        if self.hflip or (self.random_flip and torch.rand(()) < 0.5):
            tensor = tensor.flip(-1)
        return image_id, tensor, None


def collate_images(batch: list[tuple[str, torch.Tensor | None, str | None]]
             ) -> tuple[list[str], torch.Tensor | None, list[tuple[str, str]]]:
    ok = [(i, t) for i, t, e in batch if t is not None]
    failed = [(i, e or "") for i, t, e in batch if t is None]
    images = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], images, failed


class FeatureCache:
    """Chunked, resumable on-disk store of fp16 features keyed by image id."""

    def __init__(self, root: str | os.PathLike[str], key: FeatureKey) -> None:
        self.key = key
        self.dir = Path(root) / key.digest()
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "key.json"
        if not meta.exists():
            meta.write_text(json.dumps({"key": key.digest(), "encoder": key.encoder, "weights": key.weights,
                                        "preprocess": to_dict(key.preprocess), "spatial": key.spatial,
                                        "precision": key.precision, "view": key.view}, indent=2))

    def chunks(self) -> list[Path]:
        return sorted(self.dir.glob("chunk-*.safetensors"))

    def cached_ids(self) -> set[str]:
        """Ids whose features are already on disk (read from chunk metadata only)."""
        from safetensors import safe_open

        ids: set[str] = set()
        for chunk in self.chunks():
            with safe_open(str(chunk), "pt") as fh:
                ids.update(json.loads(fh.metadata()["ids"]))
        return ids

    def extract(self, items: Sequence[tuple[str, "str | CaptionRecord"]], encoder: Callable[[torch.Tensor], torch.Tensor],
                runtime: RuntimeConfig, chunk_size: int = 256,
                on_progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
        """Compute features for ``items`` ``(id, path or record)`` not yet cached; returns failures ``{id: error}``."""
        done = self.cached_ids()
        todo = [(i, p) for i, p in items if i not in done]
        failures: dict[str, str] = {}
        if not todo:
            return failures
        dataset = ImageFiles(todo, self.key.preprocess, hflip=self.key.view == "hflip")
        loader = torch.utils.data.DataLoader(dataset, batch_size=runtime.batch_size, num_workers=runtime.workers,
                                             collate_fn=collate_images)
        next_chunk = len(self.chunks())
        pending_ids: list[str] = []
        pending: list[torch.Tensor] = []
        processed = 0

        def flush() -> None:
            nonlocal next_chunk, pending_ids, pending
            if not pending_ids:
                return
            feats = torch.cat(pending).half()
            atomic_save_safetensors({"features": feats}, self.dir / f"chunk-{next_chunk:05d}.safetensors",
                                    {"ids": json.dumps(pending_ids)})
            next_chunk += 1
            pending_ids, pending = [], []

        for ids, images, failed in loader:
            failures.update(dict(failed))
            if images is not None:
                pending.append(encoder(images).cpu())
                pending_ids.extend(ids)
            processed += len(ids) + len(failed)
            if len(pending_ids) >= chunk_size:
                flush()
            if on_progress:
                on_progress(processed, len(todo))
        flush()
        return failures

    def load(self, ids: Sequence[str] | None = None) -> tuple[list[str], torch.Tensor]:
        """All cached features (or those of ``ids``, in that order) as one fp16 tensor."""
        all_ids: list[str] = []
        tensors = []
        for chunk in self.chunks():
            from safetensors import safe_open

            with safe_open(str(chunk), "pt") as fh:
                all_ids.extend(json.loads(fh.metadata()["ids"]))
            tensors.append(load_file(str(chunk))["features"])
        if not tensors:
            return [], torch.empty(0)
        features = torch.cat(tensors)
        if ids is None:
            return all_ids, features
        index = {i: n for n, i in enumerate(all_ids)}
        rows = torch.tensor([index[i] for i in ids], dtype=torch.long)
        return list(ids), features.index_select(0, rows)


def iter_chunks(cache: FeatureCache) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Chunks one at a time: ``(ids, fp16 features)``, for memory-bounded consumers."""
    from safetensors import safe_open

    for chunk in cache.chunks():
        with safe_open(str(chunk), "pt") as fh:
            ids = json.loads(fh.metadata()["ids"])
        yield ids, load_file(str(chunk))["features"]
