"""Loader: a :class:`SourceSet` becomes a stream of decoded :class:`Batch` es.

A ``torch.utils.data.DataLoader`` over an ``IterableDataset`` whose workers list the
sources, keep the inputs their job shard and worker own, decode them
(:mod:`batchcap.data.image_decode`) and build whole batches themselves (``batch_size=None`` in
the DataLoader), so only ``uint8`` tensors and small records cross process boundaries.

Who handles what:

* job shards (``--shard I/N``): :func:`batchcap.data.sharding.in_shard` on the input id for
  files, on the shard basename for tars (a job reads only its own tars);
* DataLoader workers: round-robin over the units this job owns (files, or whole tars),
  so every worker walks the listing but decodes only its share.

Memory is bounded: a worker holds one directory's sorted entries per level of the walk,
one tar member at a time and one batch (and up to :data:`READ_AHEAD` pictures read ahead from
URLs); the DataLoader keeps ``2 * workers`` batches in flight.
"""

from __future__ import annotations

import dataclasses
import itertools
import signal
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from batchcap.config import ImagePolicy, Preprocess
from batchcap.data.device_decode import DEVICE_DECODE_ERRORS, decode_jpegs, orient, resize_on_device
from batchcap.data.extensions import enable_heif, is_remote
from batchcap.data.image_decode import (
    DUPLICATE_ID,
    MISSING,
    OK,
    SHARD_ERROR,
    UNSUPPORTED,
    Decoded,
    allow_pillow_up_to,
    decode_bytes,
    decode_file,
    read_file,
)
from batchcap.data.inputs import (
    Duplicate,
    Entry,
    FileEntry,
    Ignored,
    InputItem,
    RowFailure,
    ShardFailure,
    SourceError,
    fingerprinted,
)
from batchcap.data.sharding import in_shard
from batchcap.data.sources import SourceSet, TarReader, shard_name
from batchcap.data.tables import TableReader

#: Pictures at URLs a worker reads ahead of its decoding, concurrently (files on disk are read in turn).
READ_AHEAD = 8
#: A worker sends a batch early once this many inputs failed, were skipped or ignored,
#: so a resumed run over a finished collection still shows progress.
COUNT_FLUSH = 4096


@dataclass
class ItemResult:
    """One input's outcome: ``ok`` or a failure status with a one-line error."""

    item: InputItem
    status: str
    error: str | None = None
    width: int | None = None
    height: int | None = None


@dataclass
class Batch:
    """Decoded pictures and the inputs that failed, from one worker."""

    images: torch.Tensor  # uint8 (n_ok, 3, H, W), row i is ok[i]
    ok: list[ItemResult] = field(default_factory=list)
    failed: list[ItemResult] = field(default_factory=list)
    ignored: int = 0  # hidden / non-image names passed over
    skipped: int = 0  # inputs already captioned (``done``)
    #: ``--decode-on-device``: rows of ``images`` still blank, their EXIF orientations, and their
    #: JPEG files end to end in one ``uint8`` tensor (one shared-memory segment per batch, not
    #: one per picture) with each file's end offset, for :func:`batchcap.data.loader.fill_batch`.
    encoded_rows: list[int] = field(default_factory=list)
    orientations: list[int] = field(default_factory=list)
    encoded_data: torch.Tensor | None = None
    encoded_ends: list[int] = field(default_factory=list)
    #: The names counted in ``ignored``: (what they are, e.g. ``.heic`` or ``hidden``; the path).
    ignored_paths: list[tuple[str, str]] = field(default_factory=list)
    #: A source that failed in a worker (a folder URL's listing broke off): :func:`iter_batches`
    #: raises it as :class:`SourceError` in the main process, where it is a one-line error, not a
    #: worker's traceback. The batch's rows are dropped with it (a rerun captions them).
    source_error: str | None = None

    def encoded(self) -> list[torch.Tensor]:
        """Each undecoded JPEG's bytes, a view into ``encoded_data``."""
        starts = [0, *self.encoded_ends[:-1]]
        assert self.encoded_data is not None or not self.encoded_ends
        return [self.encoded_data[a:b] for a, b in zip(starts, self.encoded_ends)]  # type: ignore[index]

    def __len__(self) -> int:
        return len(self.ok) + len(self.failed)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread (it does not look inside dataclasses)."""
        self.images = self.images.pin_memory()
        return self


class _Builder:
    """Collects results in a worker until a batch is full."""

    def __init__(self, preprocess: Preprocess, batch_size: int) -> None:
        self.shape = (0, 3, preprocess.height, preprocess.width)
        self.batch_size = batch_size
        self.reset()

    def reset(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.ok: list[ItemResult] = []
        self.failed: list[ItemResult] = []
        self.ignored = 0
        self.ignored_paths: list[tuple[str, str]] = []
        self.skipped = 0
        self.encoded_rows: list[int] = []
        self.encoded: list[bytes] = []
        self.orientations: list[int] = []

    def add(self, item: InputItem, outcome: Decoded) -> None:
        result = ItemResult(item, outcome.status, outcome.error, outcome.width, outcome.height)
        if outcome.encoded is not None:  # decoded later, on the device: a blank row holds its place
            self.encoded_rows.append(len(self.ok))
            self.encoded.append(outcome.encoded)
            self.orientations.append(outcome.orientation)
            self.tensors.append(torch.zeros(self.shape[1:], dtype=torch.uint8))
            self.ok.append(result)
        elif outcome.tensor is not None:
            self.tensors.append(outcome.tensor)
            self.ok.append(result)
        else:
            self.failed.append(result)

    def full(self) -> bool:
        """``batch_size`` pictures, or many records without one (failures, skips, ignored names).

        Failures do not count toward the pictures, so every batch but a worker's last
        holds exactly ``batch_size`` of them and the encoder sees one shape.
        """
        counted = len(self.failed) + self.ignored + self.skipped
        return len(self.ok) >= self.batch_size or counted >= COUNT_FLUSH

    def empty(self) -> bool:
        return not (self.ok or self.failed or self.ignored or self.skipped)

    def take(self) -> Batch:
        images = torch.stack(self.tensors) if self.tensors else torch.empty(self.shape, dtype=torch.uint8)
        data, ends = None, []
        if self.encoded:
            data = torch.frombuffer(bytearray(b"".join(self.encoded)), dtype=torch.uint8)
            ends = list(itertools.accumulate(len(e) for e in self.encoded))
        batch = Batch(
            images, self.ok, self.failed, self.ignored, self.skipped, self.encoded_rows, self.orientations, data, ends
        )
        batch.ignored_paths = self.ignored_paths
        self.reset()
        return batch


class BatchDataset(IterableDataset):
    """Yields whole :class:`Batch` es; each DataLoader worker takes a disjoint share of the units."""

    def __init__(
        self,
        sources: SourceSet,
        preprocess: Preprocess,
        policy: ImagePolicy,
        batch_size: int,
        shard_index: int = 0,
        shard_count: int = 1,
        done: Mapping[str, tuple[int | None, int | None]] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}/{shard_count}")
        self.sources = sources
        self.preprocess = preprocess
        self.policy = policy
        self.batch_size = batch_size
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.done = done or {}

    def _mine(self, key: str, counter: list[int], worker: int, workers: int) -> bool:
        """Whether this job shard owns ``key`` and, among its units, this worker's turn has come."""
        if not in_shard(key, self.shard_index, self.shard_count):
            return False
        turn = counter[0] % workers
        counter[0] += 1
        return turn == worker

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        allow_pillow_up_to(self.policy)
        enable_heif()  # in this worker, before its first picture
        builder = _Builder(self.preprocess, self.batch_size)
        try:
            yield from self._batches(builder, worker, workers)
        except SourceError as exc:
            stopped = builder.take()
            stopped.source_error = str(exc)
            yield stopped
            return
        if not builder.empty():
            yield builder.take()

    def _batches(self, builder: _Builder, worker: int, workers: int) -> Iterator[Batch]:
        """This worker's full batches, reader after reader; the last, partial one stays in ``builder``."""
        counter = [0]
        seen = self.sources.id_tracker()  # every worker walks every listing in one order: one owner each
        for reader in self.sources.readers:
            if isinstance(reader, TarReader):
                for url, label in reader.shards():
                    if self._mine(shard_name(url), counter, worker, workers):
                        for shard_entry in reader.read_shard(url, label):
                            yield from self._handle(shard_entry, builder)
                continue
            if isinstance(reader, TableReader):  # a row group at a time
                for table in reader.tables:
                    for key, group in table.units():
                        if self._mine(key, counter, worker, workers):
                            for row in table.read(group):
                                yield from self._handle(row, builder)
                continue
            mine = (
                entry
                for entry in self.sources.entries(reader, seen)
                if self._mine(entry.path if isinstance(entry, Ignored) else entry.item.id, counter, worker, workers)
            )
            for entry, read in self._read_ahead(mine):
                yield from self._handle(entry, builder, read)

    def _read_ahead(self, entries: Iterator[Entry]) -> Iterator[tuple[Entry, Future[bytes | Decoded] | None]]:
        """``entries`` in order, each picture at a URL not yet done paired with its read, started up to
        :data:`READ_AHEAD` entries early on a few threads: a request's latency, not this worker's CPU,
        would otherwise bound its rate. Local files are read when decoded (None), as before."""
        pool: ThreadPoolExecutor | None = None
        window: deque[tuple[Entry, Future[bytes | Decoded] | None]] = deque()
        try:
            for entry in entries:
                read = None
                if isinstance(entry, FileEntry) and is_remote(entry.item.source):
                    if not self._is_done(entry.item, member=False):  # a URL's fingerprint is its listing's
                        pool = pool or ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="batchcap-read")
                        read = pool.submit(read_file, entry.item.source, self.policy, entry.item.size)
                window.append((entry, read))
                if len(window) > READ_AHEAD:
                    yield window.popleft()
            while window:
                yield window.popleft()
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _handle(self, entry: Entry, builder: _Builder, read: Future[bytes | Decoded] | None = None) -> Iterator[Batch]:
        if isinstance(entry, Ignored):
            builder.ignored += 1
            builder.ignored_paths.append((entry.category, entry.source or entry.path))
        elif isinstance(entry, Duplicate):
            item = entry.item if entry.member else fingerprinted(entry.item)
            if self._is_done(item, member=entry.member):
                builder.skipped += 1
            else:
                builder.add(item, Decoded(DUPLICATE_ID, entry.error))
        elif isinstance(entry, ShardFailure):
            builder.add(entry.item, Decoded(SHARD_ERROR, entry.error))
        elif isinstance(entry, RowFailure):
            builder.add(entry.item, Decoded(MISSING, entry.error))
        elif isinstance(entry, FileEntry):
            item = fingerprinted(entry.item)  # stat only what this worker owns
            if self._is_done(item, member=False):
                builder.skipped += 1
            else:
                builder.add(item, self._decode_file(item.source, read))
        elif self._is_done(entry.item, member=True):
            builder.skipped += 1
        elif entry.data is None:
            builder.add(
                entry.item,
                Decoded(
                    UNSUPPORTED,
                    entry.why
                    or f"no image member (looked for "
                    f"{', '.join(self.policy.image_keys)}; "
                    f"has {', '.join(entry.members) or 'nothing'})",
                ),
            )
        else:
            builder.add(entry.item, decode_bytes(entry.data, self.preprocess, self.policy))
        if builder.full():
            yield builder.take()

    def _decode_file(self, path: str, read: Future[bytes | Decoded] | None) -> Decoded:
        """``path`` decoded, from the bytes ``read`` already fetched when there is one."""
        if read is None:
            return decode_file(path, self.preprocess, self.policy)
        data = read.result()
        return data if isinstance(data, Decoded) else decode_bytes(data, self.preprocess, self.policy)

    def _is_done(self, item: InputItem, member: bool) -> bool:
        """A tar member is done when its id is known; a file when its fingerprint also matches."""
        fingerprint = self.done.get(item.id)
        if fingerprint is None:
            return False
        return member or tuple(fingerprint) == (item.size, item.mtime_ns)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decode is Pillow's; N workers x N torch threads would oversubscribe
    # Ctrl-C signals the whole process group and scancel every process of the job: the main
    # process decides how to stop (batchcap.pipeline.interrupt) and shuts its workers down. A worker
    # killed by a signal would make torch raise in the main process at any instant, or stop
    # the batch it waits for from ever arriving. (An orphaned worker still exits: torch's
    # watchdog sees its parent gone.)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def iter_batches(
    sources: SourceSet,
    preprocess: Preprocess,
    policy: ImagePolicy,
    *,
    batch_size: int,
    workers: int,
    shard_index: int = 0,
    shard_count: int = 1,
    done: Mapping[str, tuple[int | None, int | None]] | None = None,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """Decoded batches of this job shard's inputs; every input lands in exactly one batch.

    ``done`` maps ids to the (size, mtime_ns) already captioned: an unchanged file is
    skipped (counted in ``Batch.skipped``), a changed one is decoded again; a tar member
    is skipped when its id is present. ``workers=0`` decodes in this process. The
    ``ignored`` and ``skipped`` counts summed over all batches are the run's totals.
    """
    dataset = BatchDataset(sources, preprocess, policy, batch_size, shard_index, shard_count, done)
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if workers > 0 else None,
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
    )
    batches = iter(loader)
    try:
        for batch in batches:
            if batch.source_error is not None:
                raise SourceError(batch.source_error)
            yield batch
    finally:
        _stop_workers(batches)


def _stop_workers(batches: Iterator[Batch]) -> None:
    """Shut the DataLoader's workers down now, however the loop over ``batches`` ended.

    When a worker raises (a reader's bug) or dies, torch re-raises in this process; the
    traceback then keeps the loader's iterator, and with it its workers, alive until the
    interpreter exits. Workers ignore SIGTERM (see :func:`_worker_init`), so
    multiprocessing's exit handler, which terminates and then joins them, would wait for
    ever. Stopping them here makes a failing worker a prompt crash, not a hang.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)  # absent with workers=0
    if shutdown is not None:
        shutdown()


def fill_batch(batch: Batch, preprocess: Preprocess, policy: ImagePolicy, device: str | torch.device) -> None:
    """Decode ``batch``'s undecoded JPEGs on ``device``; ``batch.images`` becomes a device tensor.

    Pictures the device cannot decode fall back to Pillow here; one that Pillow cannot decode
    either moves from ``batch.ok`` to ``batch.failed`` with its status and error, so rows stay
    one per input.
    """

    if not batch.encoded_rows:
        return
    rows, encoded = list(batch.encoded_rows), batch.encoded()
    images = batch.images.to(device, non_blocking=True)
    decoded = decode_jpegs(encoded, device)
    pillow = dataclasses.replace(policy, decode_on_device=False)
    bad: dict[int, tuple[str, str | None]] = {}
    for row, data, orientation, picture in zip(rows, encoded, batch.orientations, decoded):
        tensor: torch.Tensor | None = None
        if isinstance(picture, torch.Tensor):
            try:
                tensor = resize_on_device(orient(picture, orientation), preprocess)
            except DEVICE_DECODE_ERRORS:
                tensor = None
        if tensor is None:  # the device could not: Pillow, the path every other picture takes
            outcome = decode_bytes(data.numpy().tobytes(), preprocess, pillow)
            if outcome.status != OK or outcome.tensor is None:
                bad[row] = (outcome.status, outcome.error)
                continue
            tensor = outcome.tensor.to(device)
        images[row] = tensor
    batch.encoded_rows, batch.orientations, batch.encoded_data, batch.encoded_ends = [], [], None, []
    if bad:
        keep = [row for row in range(len(batch.ok)) if row not in bad]
        batch.failed = batch.failed + [
            dataclasses.replace(batch.ok[row], status=status, error=error) for row, (status, error) in bad.items()
        ]
        batch.ok = [batch.ok[row] for row in keep]
        images = images[torch.tensor(keep, dtype=torch.long, device=images.device)]
    batch.images = images
