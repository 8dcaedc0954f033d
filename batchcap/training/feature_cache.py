"""The training feature cache: encoder features computed once, reused across epochs and runs.

A cache lives in ``<cache_dir>/<key>/`` where ``key`` hashes everything that changes the
features: encoder name, weights identity, resolved preprocessing, spatial or pooled,
precision and the augmentation view. Any change gives a new key -- an old cache is
never silently reused. Features are written in chunks (``chunk-NNNNN.safetensors``,
fp16, ids in the metadata), each one atomically, so an interrupted extraction resumes
where it stopped.

Training holds a split's features as one tensor. When that tensor would take more than
the memory budget (:func:`feature_memory_budget`: half the memory available, or
``BATCHCAP_FEATURE_MEMORY_GIB``), it is assembled in a memory-mapped file beside the
cache instead, unlinked at once: the kernel pages it in and out, so a COCO-size cache
(tens of GiB of fp16) trains on a machine with less memory, and nothing is left behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from batchcap.config import ImagePolicy, Preprocess, RuntimeConfig, to_dict
from batchcap.data.captions.records import CaptionRecord, read_image_bytes
from batchcap.data.image_decode import decode_bytes, decode_file
from batchcap.fileio import atomic_save_safetensors

FEATURE_MEMORY_ENV = "BATCHCAP_FEATURE_MEMORY_GIB"


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` (Linux), else ``None``."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def feature_memory_budget(environ: Mapping[str, str] | None = None) -> float:
    """Bytes of features one split may hold in memory: ``BATCHCAP_FEATURE_MEMORY_GIB``, else half the available.

    Half leaves the rest to the decoder, the exit flow's activations, AdamW and the page
    cache that a memory-mapped split reads through. Unknown available memory: no limit.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(FEATURE_MEMORY_ENV, "").strip()
    if value:
        try:
            gib = float(value)
        except ValueError:
            raise ValueError(
                f"{FEATURE_MEMORY_ENV}={value!r}: expected a number of GiB (0: always map features from disk)"
            ) from None
        if gib < 0:
            raise ValueError(f"{FEATURE_MEMORY_ENV}={value!r}: expected 0 or more GiB")
        return gib * 2**30
    available = available_memory_bytes()
    return float("inf") if available is None else 0.5 * available


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


class FeatureSpaceError(Exception):
    """No room on disk for a memory-mapped split: the message says how much and what to do."""


def file_backed_empty(folder: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor whose memory is a file in ``folder``, already unlinked.

    Pages are written back to the file, not held as anonymous memory, so the kernel can
    drop them under pressure; the space is freed when the tensor is (or the process ends).
    The file's blocks are reserved first (``posix_fallocate``): a sparse file on a disk that
    fills up would kill the process with SIGBUS at the first page that finds no room.
    """
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    fd, name = tempfile.mkstemp(prefix=".split-", suffix=".bin", dir=folder)
    try:
        try:
            os.posix_fallocate(fd, 0, max(1, nbytes))
        except OSError as exc:
            raise FeatureSpaceError(
                f"no room for {_size(nbytes)} of features, memory-mapped beside the cache in {folder} "
                f"({exc.strerror}): free disk space there, give --cache-dir on a larger disk, or set "
                f"{FEATURE_MEMORY_ENV} to the GiB this machine can hold in memory"
            ) from exc
        flat = torch.from_file(name, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(fd)
        os.unlink(name)
    return flat.view(shape)


def is_file_backed(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` lives in a memory-mapped file (:func:`file_backed_empty`)."""
    return tensor.numel() > 0 and tensor.untyped_storage().filename is not None


@dataclass(frozen=True)
class FeatureKey:
    """What determines a feature tensor; its hash names the cache folder."""

    encoder: str
    weights: str  # sha256 of the weights file, or "pretrained:<tag>"
    preprocess: Preprocess
    spatial: bool
    precision: str
    view: str = "plain"  # "plain" | "hflip"
    layer: str = ""  # "": the encoder's output; "block11": the trunk an exit-flow fine-tune starts from

    def doc(self) -> dict:
        doc = {
            "encoder": self.encoder,
            "weights": self.weights,
            "preprocess": to_dict(self.preprocess),
            "spatial": self.spatial,
            "precision": self.precision,
            "view": self.view,
        }
        return {**doc, "layer": self.layer} if self.layer else doc  # older caches keep their names

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.doc(), sort_keys=True).encode()).hexdigest()[:16]


class ImageFiles(torch.utils.data.Dataset):
    """Pictures for training, decoded by the same stage as ``batchcap run`` (:mod:`batchcap.data.image_decode`).

    Sharing the decode policy (EXIF, modes, alpha, draft, limits) and the preprocessing
    is what keeps training features and captioning features from drifting apart. A
    failure yields its status and message instead of a tensor.
    """

    def __init__(
        self,
        items: Sequence[tuple[str, str | CaptionRecord]],
        preprocess: Preprocess,
        hflip: bool,
        random_flip: bool = False,
        policy: ImagePolicy = ImagePolicy(),
    ) -> None:
        self.items = list(items)
        self.preprocess = preprocess
        self.hflip = hflip
        self.random_flip = random_flip  # training augmentation: mirror half of the pictures
        self.policy = policy

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str | None]:
        image_id, where = self.items[index]
        path = where if isinstance(where, str) else where.path
        if path is not None:
            decoded = decode_file(path, self.preprocess, self.policy)
        else:
            assert not isinstance(where, str)
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


def collate_images(
    batch: list[tuple[str, torch.Tensor | None, str | None]],
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
            meta.write_text(json.dumps({"key": key.digest(), **key.doc()}, indent=2))

    def chunks(self) -> list[Path]:
        return sorted(self.dir.glob("chunk-*.safetensors"))

    def cached_ids(self) -> set[str]:
        """Ids whose features are already on disk (read from chunk metadata only)."""
        return {i for chunk in self.chunks() for i in self._chunk_ids(chunk)}

    def extract(
        self,
        items: Sequence[tuple[str, str | CaptionRecord]],
        encoder: Callable[[torch.Tensor], torch.Tensor],
        runtime: RuntimeConfig,
        chunk_size: int = 256,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, str]:
        """Compute features for ``items`` ``(id, path or record)`` not yet cached; returns failures ``{id: error}``."""
        done = self.cached_ids()
        todo = [(i, p) for i, p in items if i not in done]
        failures: dict[str, str] = {}
        if not todo:
            return failures
        dataset = ImageFiles(todo, self.key.preprocess, hflip=self.key.view == "hflip")
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=runtime.batch_size,
            num_workers=runtime.workers,
            collate_fn=collate_images,
            pin_memory=torch.device(runtime.device).type == "cuda",
        )
        pending_ids: list[str] = []
        pending: list[torch.Tensor] = []
        processed = 0

        def flush() -> None:
            nonlocal pending_ids, pending
            if not pending_ids:
                return
            self.write_chunk(pending_ids, torch.cat(pending))
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

    def write_chunk(self, ids: Sequence[str], features: torch.Tensor) -> Path:
        """Store ``features`` (one row per id, kept as fp16) as the next chunk, atomically."""
        path = self.dir / f"chunk-{len(self.chunks()):05d}.safetensors"
        atomic_save_safetensors({"features": features.half()}, path, {"ids": json.dumps(list(ids))})
        return path

    def load(
        self, ids: Sequence[str] | None = None, memory_budget: float | None = None
    ) -> tuple[list[str], torch.Tensor]:
        """All cached features (or those of ``ids``, in that order) as one fp16 tensor.

        Chunks are read one at a time and only the wanted rows are kept, so loading the
        validation split never holds the whole cache (gigabytes for Flickr8k) in memory.
        A tensor larger than ``memory_budget`` bytes (default :func:`feature_memory_budget`)
        is file-backed (:func:`file_backed_empty`), beside the cache.
        """
        if ids is None:
            ids = [i for chunk in self.chunks() for i in self._chunk_ids(chunk)]
        wanted = {image_id: row for row, image_id in enumerate(ids)}
        out: torch.Tensor | None = None
        found = 0
        for chunk in self.chunks():
            chunk_ids = self._chunk_ids(chunk)
            pairs = [(n, wanted[i]) for n, i in enumerate(chunk_ids) if i in wanted]
            if not pairs:
                continue
            with safe_open(str(chunk), "pt") as fh:
                features = fh.get_tensor("features")  # fp16 (n, R, F)
            if out is None:
                shape = (len(ids), *features.shape[1:])
                budget = feature_memory_budget() if memory_budget is None else memory_budget
                if features[:1].nbytes * len(ids) > budget:
                    out = file_backed_empty(self.dir, shape, features.dtype)
                else:
                    out = torch.empty(shape, dtype=features.dtype)
            src, dst = (torch.tensor(v, dtype=torch.long) for v in zip(*pairs))
            out[dst] = features[src]
            found += len(pairs)
        if found != len(ids):
            raise KeyError(f"{len(ids) - found} of the requested ids are not in the feature cache {self.dir}")
        return list(ids), out if out is not None else torch.empty(0)

    @staticmethod
    def _chunk_ids(chunk: Path) -> list[str]:
        with safe_open(str(chunk), "pt") as fh:
            return json.loads(fh.metadata()["ids"])
