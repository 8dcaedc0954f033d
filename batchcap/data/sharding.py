"""Deterministic sharding: which of N cooperating jobs handles which input.

The assignment is a pure function of an input's key and N: ``blake2b(key) mod N``.
Because it looks at nothing but the key, the N subsets are disjoint and together
complete, and an input keeps its shard however the collection grows -- appended,
inserted or reordered (Python's ``hash()`` is salted per process and would not do).

Keys: for folders, file lists and single pictures the key is the input's id, so
assignment is per picture. For WebDataset sources it is the shard's basename
(:func:`batchcap.data.sources.shard_name`): a job reads only the tars it owns instead of
every job reading every tar. The price is coarser balance: with few tars and many jobs
some jobs get more samples than others (or none).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping


class ShardError(ValueError):
    """A ``--shard`` value or Slurm array environment that cannot be mapped to a shard."""


def shard_of(key: str, count: int) -> int:
    """The shard (0..count-1) that owns ``key``: a stable 64-bit blake2b hash mod ``count``."""
    if count < 1:
        raise ValueError(f"shard count must be >= 1, not {count}")
    if count == 1:
        return 0
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def in_shard(key: str, index: int, count: int) -> bool:
    """Whether shard ``index`` of ``count`` owns ``key``."""
    return count == 1 or shard_of(key, count) == index


def select(keys: Iterable[str], index: int, count: int) -> Iterator[str]:
    """The keys shard ``index`` of ``count`` owns, in their original order."""
    return (k for k in keys if in_shard(k, index, count))


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), with 0 <= I < N; :class:`ShardError` otherwise."""
    parts = text.strip().split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        index, count = int(parts[0]), int(parts[1])
    except ValueError:
        raise ShardError(f"--shard {text!r}: expected I/N, e.g. 0/4 for the first of four jobs") from None
    if count < 1 or not 0 <= index < count:
        raise ShardError(f"--shard {text!r}: need 0 <= I < N (shards are numbered from 0), e.g. 0/{max(count, 1)}")
    return index, count


def _env_int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ShardError(f"{name}={environ[name]!r} is not an integer; pass --shard I/N instead") from None


def resolve_shard(option: str | None, environ: Mapping[str, str]) -> tuple[int, int]:
    """The (index, count) this job handles: ``--shard`` if given, else a Slurm job array, else (0, 1).

    From Slurm, the index is ``(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) // step`` and
    the count ``SLURM_ARRAY_TASK_COUNT``, so ``--array=1-8`` and ``--array=0-14:2`` work.
    Arrays with gaps (``--array=1,5,9``) cannot be mapped reliably; pass ``--shard``.
    """
    if option is not None:
        return parse_shard(option)
    has_id = "SLURM_ARRAY_TASK_ID" in environ
    has_count = "SLURM_ARRAY_TASK_COUNT" in environ
    if not has_id and not has_count:
        return 0, 1
    if has_id != has_count:
        raise ShardError("only one of SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT is set; pass --shard I/N")
    task_id = _env_int(environ, "SLURM_ARRAY_TASK_ID")
    count = _env_int(environ, "SLURM_ARRAY_TASK_COUNT")
    low = _env_int(environ, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in environ else 0
    step = _env_int(environ, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in environ else 1
    if step < 1 or (task_id - low) % step:
        raise ShardError(f"Slurm array task {task_id} does not fit min {low} / step {step}; pass --shard I/N")
    index = (task_id - low) // step
    if count < 1 or not 0 <= index < count:
        raise ShardError(
            f"Slurm array task {task_id} (min {low}, step {step}) is not one of {count} tasks "
            "(an array with gaps?); pass --shard I/N"
        )
    return index, count
