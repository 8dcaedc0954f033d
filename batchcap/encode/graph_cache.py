"""Converted encoder graphs on disk, keyed by everything they depend on, shared safely between processes.

A graph is built in a temporary folder and renamed into place, so concurrent Slurm tasks on one node
share it and a reader never sees half a model. A rerun pays no conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchcap.config import Preprocess, to_dict

ENV_CACHE = "BATCHCAP_ENCODER_CACHE"


#: Bump when the converted graph changes meaning (input/output layout, normalisation), so old caches are not used.
GRAPH_FORMAT = 1


#: The batch dimension of the converted graph is dynamic: one graph serves every batch size, last batch included.
BATCH_POLICY = "dynamic-batch"


class CacheUnusable(Exception):
    """The encoder cache folder cannot be created or written."""


# -- the cache ---------------------------------------------------------------------------------
def cache_root(
    explicit: str | os.PathLike[str] | None = None, environ: os._Environ[str] | dict[str, str] | None = None
) -> Path:
    """Where converted encoders live: ``explicit``, else ``$BATCHCAP_ENCODER_CACHE``, else
    ``$XDG_CACHE_HOME/batchcap``, else ``~/.cache/batchcap``."""
    environ = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if environ.get(ENV_CACHE):
        return Path(environ[ENV_CACHE])
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "batchcap"


def weights_sha256(backbone: nn.Module) -> str:
    """A hash of the encoder's tensors as loaded (names, dtypes, shapes, bytes): tells fine-tuned weights apart."""
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def backbone_identity(backbone: nn.Module) -> tuple[str, str]:
    """(architecture, weights digest) of a built network, for the cache key."""
    arch = getattr(backbone, "pretrained_cfg", {}).get("architecture") or type(backbone).__name__
    return arch, weights_sha256(backbone)


def cache_fields(
    identity: tuple[str, str],
    preprocess: Preprocess,
    spatial: bool,
    stored_precision: str,
    version: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a converted graph depends on; its hash names the cache folder.

    ``identity`` is (architecture, weights digest): :func:`backbone_identity` of a built network, or
    :func:`batchcap.encode.weights.stored_identity` of the weights as stored, which needs no network.
    """
    arch, digest = identity
    return {
        "graph_format": GRAPH_FORMAT,
        "encoder": arch,
        "weights_sha256": digest,
        "preprocess": to_dict(preprocess),
        "spatial": spatial,
        "precision": stored_precision,
        "batch": BATCH_POLICY,
        "openvino": version,
        **(extra or {}),
    }


def cache_key(fields: dict[str, Any]) -> str:
    """A short, stable name for ``fields``."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def cached_graph(
    root: Path,
    fields: dict[str, Any],
    build: Callable[[], Any],
    log: Callable[[str], None] | None = None,
    extra_info: dict[str, Any] | None = None,
    announce: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """The cached graph for ``fields`` (``encoder.xml``), calling ``build`` to make it on a miss.

    The graph is written into a temporary folder beside its final place and renamed
    there in one step; when another process got there first its copy is kept (it is the
    same graph) and ours is removed. Returns the XML path and the folder's ``info.json``
    (``fields``, the build time, and ``extra_info`` as ``build`` left it). ``announce``
    logs the conversion before it starts (a builder that may refuse says it itself).
    """
    import openvino as ov

    key = cache_key(fields)
    folder = root / "openvino" / f"{fields['encoder']}-{fields['precision']}-{key}"
    xml = folder / "encoder.xml"
    if xml.is_file():
        return xml, _read_info(folder, fields)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=folder.parent))
    except OSError as exc:
        raise CacheUnusable(
            f"encoder cache {root}: cannot write there ({exc.strerror or exc}); pass "
            f"--encoder-cache DIR or set {ENV_CACHE} to a writable folder"
        ) from exc
    if log and announce:
        log(f"converting the encoder to OpenVINO ({fields['precision']}); first use only, the result is cached")
    started = time.perf_counter()
    try:
        graph = build()
        ov.save_model(graph, str(tmp / "encoder.xml"), compress_to_fp16=False)
        info = {
            **fields,
            **(extra_info or {}),
            "build_seconds": round(time.perf_counter() - started, 2),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(tmp, folder)  # atomic; fails when the folder already exists
        except OSError:
            if not xml.is_file():
                raise
        else:
            if log:
                log(f"converted in {info['build_seconds']:.1f} s; cached in {folder}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return xml, _read_info(folder, fields)


def _read_info(folder: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """A cache folder's ``info.json``; its key fields when the file was removed by hand."""
    try:
        return json.loads((folder / "info.json").read_text())
    except (OSError, ValueError):
        return dict(fields)
