"""``batchcap bench``: measure this machine, so jobs can be sized from numbers, not guesses.

Every figure is the median of ``repeats`` timed runs after one untimed warm-up, and
every ratio is taken between figures measured in this one process:

* **encoder** -- the bare encoder (input already on the device, no decoding, no search)
  in images/s for each precision the hardware has (fp32, fp32 + channels_last,
  bf16 + channels_last with native bf16, fp16 + channels_last on CUDA), and a sweep
  of batch sizes at the precision ``run`` would use;
* **decode** -- read + decode + resize to the model's input, one process (what one
  DataLoader worker does), and the loader with ``--workers`` processes;
* **beam** -- captions/s of the vectorised beam search from real features;
* **end to end** -- :func:`batchcap.pipeline.runner.run_job` exactly as ``batchcap run`` calls it,
  on the images into a temporary output. Reported two ways: the *whole run* (model
  load, worker start-up and pipeline fill included: what a user waits for), and the
  *steady state*, ``(N - n) / (t(N) - t(n))`` from a run over the first ``n`` images and
  one over all ``N``, in which the start-up costs cancel;
* **reference** -- the tutorial-style path of :mod:`batchcap.tools.reference` on a few images.

The figures go to a rich table, or to stdout as JSON with ``--json``; notes on what is
being measured go to stderr.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchcap.config import (
    BeamConfig,
    DecoderConfig,
    EncoderConfig,
    ImagePolicy,
    Preprocess,
    RunConfig,
    RuntimeConfig,
    to_dict,
)
from batchcap.data.extensions import is_image_name
from batchcap.data.image_decode import decode_file
from batchcap.data.loader import iter_batches
from batchcap.data.sources import SourceError, open_sources
from batchcap.encode.factory import build_encoder
from batchcap.encode.openvino_backend import openvino_version
from batchcap.encode.torch_backend import build_backbone
from batchcap.encode.weights import EncoderError, resolve_encoder_weights, stored_identity
from batchcap.fileio import file_sha256
from batchcap.hardware import available_cpus, cpu_flags, cpu_has_native_bf16
from batchcap.model.decoder import CaptionDecoder
from batchcap.model.modelfile import CaptionModel, EncoderSpec, load_model, resolve_model_path, save_model
from batchcap.model.text import SPECIAL_TOKENS, Vocabulary
from batchcap.pipeline.captioner import Captioner, search_threads
from batchcap.pipeline.runner import run_job
from batchcap.pipeline.settings import beam_config, runtime_config
from batchcap.tools.reference import ReferenceCaptioner
from batchcap.version import __version__

#: The encoder weights file the packaged default model references (fp16 Keras ImageNet Xception).
XCEPTION_WEIGHTS_FILE = "legacy_xception-keras-imagenet-fp16.safetensors"


# -- timing ------------------------------------------------------------------------------------
def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], Any], repeats: int, device: torch.device | str = "cpu", warmup: int = 1, min_seconds: float = 0.0
) -> tuple[float, int]:
    """Median seconds per call of ``fn`` over ``repeats`` timed runs, and calls per run.

    A run repeats ``fn`` until ``min_seconds`` have passed (fast GPU calls are timed in
    groups, so clock and launch noise do not dominate); one untimed warm-up first.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - start, 1e-9)
    calls = max(1, math.ceil(min_seconds / once)) if min_seconds > 0 else 1
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples), calls


def _note(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"bench: {message}", file=sys.stderr, flush=True)


# -- machine -----------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is often empty)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""

    usable = available_cpus()
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "batchcap": __version__,
        "device": str(device),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "openvino": openvino_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# -- inputs ------------------------------------------------------------------------------------
def parse_size(size: str) -> tuple[int, int]:
    """``"WxH"`` -> (W, H)."""
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {size!r}: expected WxH, e.g. 224x224") from None
    if w < 1 or h < 1:
        raise ValueError(f"size {size!r}: width and height must be positive")
    return w, h


def write_bench_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0, distinct: int = 8) -> list[Path]:
    """``count`` photo-like JPEGs (smooth colour fields plus grain, quality 90) of ``size``.

    Random noise would make JPEGs several times larger and slower to decode than photos;
    this content gives about 4 MB at 4000x3000, like a phone picture. Only ``distinct``
    pictures are encoded, the rest are byte copies (decoding costs the same).
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    blobs = []
    for _ in range(min(count, distinct)):
        small = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, size=(h, w, 3), dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    paths = []
    for i in range(count):
        path = folder / f"bench{i:06d}.jpg"
        path.write_bytes(blobs[i % len(blobs)])
        paths.append(path)
    return paths


def list_images(folder: str | Path, limit: int | None = None) -> list[Path]:
    """The pictures in ``folder`` (recursively, sorted, hidden names skipped), at most ``limit``."""

    root = Path(folder)
    if not root.is_dir():
        raise SourceError(f"{folder}: batchcap bench needs a folder of pictures")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and is_image_name(f)]
        if limit is not None and len(found) >= limit:
            break
    if not found:
        raise SourceError(f"{folder}: no pictures found")
    return found[:limit] if limit is not None else found


# -- a stand-in model ---------------------------------------------------------------------------
def random_decoder_model(
    path: str | Path,
    encoder_weights: str | Path,
    vocab_size: int = 3000,
    seed: int = 0,
    end_bias: float = 0.0,
    max_caption_len: int = 20,
) -> CaptionModel:
    """A model file with the default model's encoder and preprocessing and a random decoder.

    For measuring speed (and testing) where no trained model is at hand: the encoder is
    ``legacy_xception`` referenced by the sha256 and file name of ``encoder_weights``
    (which must then be found beside the model, among the packaged assets, or given with
    ``--encoder-weights``); the decoder has the trained model's sizes (embed 256,
    hidden 512, attention 512). A random decoder rarely says ``<end>``, so its captions
    run to ``max_caption_len`` words: the slow end for the search (trained models write
    about 11 words); ``end_bias`` raises the ``<end>`` logit, though random networks tend
    to flip from "never" to "at once" within a fraction of a logit.
    """

    torch.manual_seed(seed)
    vocab = Vocabulary(SPECIAL_TOKENS + tuple(f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))))
    cfg = DecoderConfig(
        vocab_size=vocab_size,
        feature_dim=2048,
        embed_dim=256,
        hidden_dim=512,
        attention=True,
        attention_dim=512,
        dropout=0.0,
    )
    decoder = CaptionDecoder(cfg).eval()
    with torch.no_grad():
        decoder.out.weight.mul_(4.0)  # peaked word distributions, as a trained model has
        decoder.out.bias[vocab.end_id] += end_bias
    model = CaptionModel(
        name="random-decoder-standin",
        encoder=EncoderSpec(
            name="legacy_xception",
            weights_sha256=file_sha256(encoder_weights),
            weights_file=Path(encoder_weights).name,
            spatial=True,
            feature_dim=2048,
        ),
        preprocess=Preprocess(
            input_size=(3, 299, 299),
            resize="squash",
            interpolation="bicubic",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
        decoder=cfg,
        vocab=vocab,
        max_caption_len=max_caption_len,
        decoder_state=decoder.state_dict(),
        training={"data": "random decoder weights (benchmark stand-in)"},
    )
    return save_model(model, path)


# -- measurements ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One way of running the encoder: backend, precision, and (torch) memory layout."""

    precision: str
    channels_last: bool
    backend: str = "torch"

    @property
    def label(self) -> str:
        if self.backend != "torch":
            return f"{self.backend} {self.precision}"
        return self.precision + ("+channels_last" if self.channels_last else "")


def encoder_variants(device: torch.device, requested: str | None = None, openvino: bool = False) -> list[Variant]:
    """torch fp32, fp32+channels_last and the reduced precisions this hardware runs natively; then OpenVINO's.

    OpenVINO (CPU only, when importable): fp32, bf16 where native, and int8.
    """

    variants = [Variant("fp32", False), Variant("fp32", True)]
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            variants.append(Variant("bf16", True))
        variants.append(Variant("fp16", True))
    elif cpu_has_native_bf16() or requested == "bf16":
        variants.append(Variant("bf16", True))
    if openvino and device.type == "cpu":
        variants.append(Variant("fp32", False, "openvino"))
        if cpu_has_native_bf16() or requested == "bf16":
            variants.append(Variant("bf16", False, "openvino"))
        variants.append(Variant("int8", False, "openvino"))
    return variants


#: Arithmetic one core can issue per cycle, by the widest instructions its flags name (FLOP per cycle:
#: multiply and add count 2). Assumed, not measured: two FMA pipes (on AMD Zen 4, family 25, whose
#: AVX-512 runs as two 256-bit halves, the rate of two 256-bit pipes), AMX tiles at their nominal
#: rate. bf16 without native instructions runs at the fp32 rate.
FLOP_PER_CYCLE = {
    "avx2": {"fp32": 32, "bf16": 32, "int8": 64},  # 2 x 256-bit FMA; int8 through 16-bit pairs (no VNNI)
    "avx2+vnni": {"fp32": 32, "bf16": 32, "int8": 128},
    "avx512": {"fp32": 64, "bf16": 64, "int8": 128},
    "avx512-amd": {"fp32": 32, "bf16": 32, "int8": 64},
    "avx512_bf16": {"fp32": 64, "bf16": 128, "int8": 256},  # with VNNI
    "avx512_bf16-amd": {"fp32": 32, "bf16": 64, "int8": 128},
    "amx": {"fp32": 64, "bf16": 2048, "int8": 4096},  # AMX tiles for bf16 and int8, AVX-512 for fp32
}


def instruction_set(flags: set[str] | None = None, vendor: str | None = None, family: int | None = None) -> str | None:
    """The widest matrix instructions the CPU has, as a key of :data:`FLOP_PER_CYCLE` (None: unknown)."""
    flags = cpu_flags() if flags is None else flags
    vendor = vendor if vendor is not None else _cpuinfo_field("vendor_id")
    family = family if family is not None else int(_cpuinfo_field("cpu family") or 0)
    amd = vendor == "AuthenticAMD" and family < 26  # Zen 5 (family 26) has full-width AVX-512
    if {"amx_bf16", "amx_int8"} <= flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16-amd" if amd else "avx512_bf16"
    if "avx512f" in flags:
        return "avx512-amd" if amd else "avx512"
    if "avx2" in flags and "fma" in flags:
        return "avx2+vnni" if "avx_vnni" in flags else "avx2"
    return None


def _cpuinfo_field(name: str) -> str | None:
    """The first value of ``name`` in /proc/cpuinfo (None where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def hardware_peak(precision: str) -> tuple[float, str] | None:
    """(peak GFLOP/s of the usable cores at ``precision``, the assumption it rests on), or None when unknown.

    ``BATCHCAP_PEAK_GFLOPS`` replaces the table with the user's own per-core figure.
    """
    cores = available_cpus()
    if os.environ.get("BATCHCAP_PEAK_GFLOPS"):
        per_core = float(os.environ["BATCHCAP_PEAK_GFLOPS"])
        return per_core * cores, f"BATCHCAP_PEAK_GFLOPS={per_core:g} GFLOP/s per core x {cores} cores"
    isa, mhz = instruction_set(), _cpuinfo_field("cpu MHz")
    if isa is None or not mhz:
        return None
    flop = FLOP_PER_CYCLE[isa].get(precision, FLOP_PER_CYCLE[isa]["fp32"])
    ghz = float(mhz) / 1000
    return flop * ghz * cores, f"{isa}: {flop} FLOP/cycle/core at {ghz:.2f} GHz (/proc/cpuinfo) x {cores} cores"


def encoder_gmacs(backbone: Any, preprocess: Preprocess) -> float:
    """Multiply-accumulates of one picture through the encoder's convolutions and linear layers, in G."""
    total = [0]

    def count(module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            total[0] += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, torch.nn.Linear):
            total[0] += output.numel() * module.in_features

    hooks = [
        m.register_forward_hook(count) for m in backbone.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    try:
        with torch.inference_mode():
            backbone.forward_features(
                torch.zeros(1, 3, preprocess.height, preprocess.width, device=next(backbone.parameters()).device)
            )
    finally:
        for hook in hooks:
            hook.remove()
    return total[0] / 1e9


def hardware_limit(gmacs: float, precision: str, device: torch.device) -> float | None:
    """Images/s the CPU's assumed peak arithmetic allows at ``precision`` (None on a GPU, or when unknown)."""
    peak = hardware_peak(precision) if device.type == "cpu" and gmacs > 0 else None
    return peak[0] / (2.0 * gmacs) if peak else None


def build_variant_encoder(
    backbone: torch.nn.Module,
    model: CaptionModel,
    device: torch.device,
    variant: Variant,
    batch_size: int,
    encoder_cache: str | None = None,
    identity: tuple[str, str] | None = None,
) -> Any:
    """The encode stage for ``variant``: a torch encoder on a copy, or an OpenVINO one.

    ``identity`` (:func:`batchcap.encode.weights.stored_identity`) keys the OpenVINO cache as ``run`` does.
    """

    runtime = RuntimeConfig(
        device=str(device),
        precision=variant.precision,
        batch_size=batch_size,
        workers=0,
        channels_last=variant.channels_last,
        backend=variant.backend,
        encoder_cache=encoder_cache,
    )
    if variant.backend == "torch":
        backbone = copy.deepcopy(backbone).to(memory_format=torch.contiguous_format)
    return build_encoder(
        backbone, model.preprocess, runtime, spatial=model.encoder.spatial, log=lambda m: _note(m), identity=identity
    )


def measure_encoder(
    encoder: Any,
    model: CaptionModel,
    device: torch.device,
    variant: Variant,
    batch_size: int,
    repeats: int,
    limit: float | None = None,
) -> dict[str, Any]:
    """Bare encoder images/s: ``uint8`` input already on the device, features out, nothing else."""
    pre = model.preprocess
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, pre.height, pre.width), dtype=torch.uint8, generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, calls = timed(
        lambda: encoder(images), repeats, device, warmup=2, min_seconds=0.5 if device.type == "cuda" else 0.0
    )
    row = {
        "backend": variant.backend,
        "precision": variant.precision,
        "channels_last": variant.channels_last,
        "batch_size": batch_size,
        "images_per_s": batch_size / seconds,
        "seconds_per_batch": seconds,
        "batches_per_repeat": calls,
        "repeats": repeats,
        "hardware_limit_images_per_s": limit,
        "share_of_limit": (batch_size / seconds) / limit if limit else None,
    }
    if device.type == "cuda":
        row["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def batch_size_sweep(batch_size: int, device: torch.device) -> list[int]:
    """Batch sizes to try around ``batch_size``: a few on CPU; on a GPU half to 4x (the default 256 -> 1024,
    about 12 GB of encoder activations, so a 16 GB GPU gets through the sweep)."""
    if device.type == "cuda":
        return sorted({max(1, batch_size // 2), batch_size, 2 * batch_size, 4 * batch_size})
    return sorted({max(1, batch_size // 2), batch_size, 2 * batch_size})


def measure_decode(paths: list[Path], preprocess: Preprocess, policy: ImagePolicy, repeats: int) -> dict[str, Any]:
    """Read + decode + resize in this one process: what one DataLoader worker can do."""

    def run() -> None:
        for path in paths:
            decode_file(str(path), preprocess, policy)

    with torch.inference_mode():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a worker
        try:
            seconds, _ = timed(run, repeats)
        finally:
            torch.set_num_threads(threads)
    return {"images_per_s": len(paths) / seconds, "images": len(paths), "processes": 1, "repeats": repeats}


def measure_loader(
    list_file: Path,
    count: int,
    preprocess: Preprocess,
    policy: ImagePolicy,
    batch_size: int,
    workers: int,
    repeats: int,
) -> dict[str, Any]:
    """The input stage alone: :func:`batchcap.data.loader.iter_batches` with ``workers`` processes."""

    def run() -> None:
        sources = open_sources((), str(list_file), policy)
        batches = iter_batches(sources, preprocess, policy, batch_size=batch_size, workers=workers)
        n = sum(len(b) for b in batches)
        assert n == count, (n, count)

    seconds, _ = timed(run, repeats)
    return {
        "images_per_s": count / seconds,
        "images": count,
        "workers": workers,
        "repeats": repeats,
        "note": "whole pass, worker start-up included",
    }


def measure_beam(captioner: Any, images: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Captions/s of the vectorised beam search from the features of real pictures."""

    features = captioner.encode(images)
    device = torch.device(captioner.runtime.device)
    with search_threads(captioner.runtime):  # as run does it
        seconds, _ = timed(lambda: captioner.search(features), repeats, device)
        captions = captioner.search(features)
    words = [len(c.text.split()) for c in captions]
    return {
        "captions_per_s": len(captions) / seconds,
        "batch_size": len(captions),
        "beam": captioner.beam.beam_size,
        "max_len": captioner.beam.max_len,
        "mean_words": statistics.mean(words),
        "repeats": repeats,
    }


def measure_end_to_end(
    paths: list[Path],
    model_path: Path,
    beam: BeamConfig,
    runtime: RuntimeConfig,
    policy: ImagePolicy,
    encoder_weights: str | None,
    repeats: int,
    workdir: Path,
    quiet: bool = False,
) -> dict[str, Any]:
    """``run_job`` as ``batchcap run`` calls it: whole-run and steady-state images/s.

    Each timed run writes a fresh Parquet output. The steady state comes from runs over
    the first quarter of the pictures and over all of them: ``(N - n) / (t(N) - t(n))``.
    """

    n_all = len(paths)
    n_part = max(1, n_all // 4)
    lists = {}
    for n in (n_part, n_all):
        lists[n] = workdir / f"inputs-{n}.txt"
        lists[n].write_text("".join(f"{p}\n" for p in paths[:n]), encoding="utf-8")
    counter = [0]

    def run(n: int) -> None:
        counter[0] += 1
        out = workdir / f"run-{counter[0]}" / "captions.parquet"  # with its lock and work folder
        cfg = RunConfig(sources=(), out=str(out), files_from=str(lists[n]), log_every=1e9, overwrite=True)
        result = run_job(cfg, model_path, beam, runtime, policy, encoder_weights=encoder_weights, stream=io.StringIO())
        if result.exit_code != 0:
            raise RuntimeError(f"batchcap run failed during the benchmark: {result.summary}")
        shutil.rmtree(out.parent, ignore_errors=True)

    device = torch.device(runtime.device)
    _note(f"end to end: {n_all} pictures, {repeats} runs (+1 warm-up)")
    t_all, _ = timed(lambda: run(n_all), repeats, device)
    _note(f"end to end: first {n_part} pictures, {repeats} runs (+1 warm-up), for the steady state")
    t_part, _ = timed(lambda: run(n_part), repeats, device)
    steady = (n_all - n_part) / (t_all - t_part) if t_all > t_part and n_all > n_part else None
    return {
        "images": n_all,
        "whole_run_seconds": t_all,
        "whole_run_images_per_s": n_all / t_all,
        "part_images": n_part,
        "part_run_seconds": t_part,
        "steady_images_per_s": steady,
        "startup_seconds": (t_all - (n_all / steady)) if steady else None,
        "batch_size": runtime.batch_size,
        "workers": runtime.workers,
        "precision": runtime.precision,
        "channels_last": runtime.channels_last,
        "beam": beam.beam_size,
        "repeats": repeats,
    }


def measure_reference(
    model: CaptionModel,
    paths: list[Path],
    encoder_weights: str | None,
    device: torch.device,
    max_len: int,
    min_len: int,
) -> dict[str, Any]:
    """The tutorial-style path (:mod:`batchcap.tools.reference`): one picture per call, fp32, prefix re-run."""

    ref = ReferenceCaptioner(model, encoder_weights, min_len=min_len, max_len=max_len, device=device)
    ref.caption(paths[0])  # warm-up
    _sync(device)
    start = time.perf_counter()
    for path in paths:
        ref.caption(path)
    _sync(device)
    seconds = time.perf_counter() - start
    return {
        "images_per_s": len(paths) / seconds,
        "images": len(paths),
        "seconds": seconds,
        "note": "one timed pass after one warm-up picture",
    }


def suggest(sweep: list[dict[str, Any]], decode_rate: float, device: torch.device) -> dict[str, Any]:
    """Batch size: the smallest within 5% of the best rate. Workers: enough decoders to keep up.

    On a CPU the workers share cores with the encoder, so at most ``cores - 1``.
    """
    best = max(r["images_per_s"] for r in sweep)
    chosen = min((r for r in sweep if r["images_per_s"] >= 0.95 * best), key=lambda r: r["batch_size"])

    cores = available_cpus()
    need = math.ceil(1.25 * chosen["images_per_s"] / decode_rate) if decode_rate > 0 else 1
    cap = max(1, cores - 1) if device.type == "cpu" else cores
    return {
        "batch_size": chosen["batch_size"],
        "workers": max(1, min(need, cap)),
        "workers_needed_to_keep_up": need,
        "encoder_images_per_s": chosen["images_per_s"],
    }


# -- the command -------------------------------------------------------------------------------
def run_bench(
    *,
    images: str | None,
    as_json: bool,
    count: int,
    size: str,
    repeats: int,
    model: str | None,
    encoder_weights: str | None,
    device: str,
    precision: str,
    batch_size: int | None,
    workers: str,
    beam: int,
    max_len: int | None,
    min_len: int,
    length_penalty: float,
    no_repeat_ngram: int,
    n_best: int,
    backend: str = "torch",
    encoder_cache: str | None = None,
    reference_images: int = 8,
    sweep: bool = True,
    no_ending_rule: bool = False,
    allow_repeated_words: bool = False,
    style: str = "auto",
    consensus_weight: float | None = None,
) -> dict[str, Any]:
    """Measure everything ``batchcap bench`` reports; print a table (or JSON) and return the results.

    ``images`` is a folder (its first ``count`` pictures are used) or ``None`` for
    ``count`` generated JPEGs of ``size``.
    """

    try:
        generated_size = parse_size(size)
    except ValueError as exc:
        import click

        raise click.BadParameter(str(exc), param_hint="--size") from None
    model_path = resolve_model_path(model)
    loaded = load_model(model_path)
    runtime = runtime_config(device, precision, batch_size, workers, backend, encoder_cache)
    beam_cfg = beam_config(
        beam,
        max_len,
        min_len,
        length_penalty,
        no_repeat_ngram,
        n_best,
        loaded.max_caption_len,
        no_ending_rule=no_ending_rule,
        allow_repeated_words=allow_repeated_words,
        style=style,
        consensus_weight=consensus_weight,
        has_neighbours=loaded.neighbours is not None,
    )
    dev = torch.device(runtime.device)
    policy = ImagePolicy()
    results: dict[str, Any] = {"machine": machine_info(dev)}

    with tempfile.TemporaryDirectory(prefix="batchcap-bench-") as tmp:
        work = Path(tmp)
        if images:
            paths = list_images(images, limit=count)
            source = {"folder": str(images), "images": len(paths)}
        else:
            _note(f"writing {count} {size} JPEGs")
            paths = write_bench_images(work / "images", count, generated_size)
            source = {"generated": size, "images": len(paths)}
        results["settings"] = {
            "model": str(model_path),
            "model_identity": loaded.identity,
            "source": source,
            "runtime": to_dict(runtime),
            "beam": to_dict(beam_cfg),
            "repeats": repeats,
            "statistic": "median",
        }

        # encoder, per backend and precision at the batch size, then a batch-size sweep at run's choice
        backbone, encoders = _measure_encoders(loaded, encoder_weights, dev, runtime, repeats, sweep)
        results.update(encoders)
        peak = hardware_peak(runtime.precision) if dev.type == "cpu" else None
        results["hardware_limit_assumption"] = peak[1] if peak else None
        rows = encoders["encoder"]
        same = [r for r in rows if _variant(r) == _run_variant(runtime)]
        captioner = Captioner(loaded, runtime, beam_cfg, encoder_weights)

        # input stage
        _note(f"decode: {len(paths)} pictures in one process")
        results["decode"] = measure_decode(paths, loaded.preprocess, policy, repeats)
        list_file = work / "all.txt"
        list_file.write_text("".join(f"{p}\n" for p in paths), encoding="utf-8")
        _note(f"loader: {runtime.workers} workers")
        results["loader"] = measure_loader(
            list_file, len(paths), loaded.preprocess, policy, runtime.batch_size, runtime.workers, repeats
        )

        # beam search on real features
        decoded = (decode_file(str(p), loaded.preprocess, policy).tensor for p in paths)
        tensors = list(itertools.islice((t for t in decoded if t is not None), runtime.batch_size))
        if not tensors:
            raise SourceError(f"{images}: none of the first {len(paths)} pictures could be decoded")
        _note(f"beam search: {len(tensors)} captions, beam {beam_cfg.beam_size}")
        results["beam"] = measure_beam(captioner, torch.stack(tensors), repeats)
        del captioner, backbone

        # the whole job, then the tutorial-style path on a few of the same pictures
        results["end_to_end"] = measure_end_to_end(
            paths, model_path, beam_cfg, runtime, policy, encoder_weights, repeats, work
        )
        n_ref = max(1, min(reference_images, len(paths)))
        _note(f"tutorial-style reference: {n_ref} pictures")
        results["reference"] = measure_reference(
            loaded, paths[:n_ref], encoder_weights, dev, beam_cfg.max_len, beam_cfg.min_len
        )

    results["ratios"] = _ratios(rows, same, results)
    results["suggested"] = suggest(results["batch_sizes"], results["decode"]["images_per_s"], dev)
    if as_json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print_tables(results)
    return results


def _run_variant(runtime: RuntimeConfig) -> Variant:
    """The encoder variant ``batchcap run`` would use with these settings."""
    return Variant(runtime.precision, runtime.channels_last if runtime.backend == "torch" else False, runtime.backend)


def _measure_encoders(
    loaded: CaptionModel,
    encoder_weights: str | None,
    dev: torch.device,
    runtime: RuntimeConfig,
    repeats: int,
    sweep: bool,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The bare encoder per backend and precision at the run's batch size, then run's variant over batch sizes."""
    encoder_cfg = EncoderConfig(name=loaded.encoder.name, spatial=loaded.encoder.spatial)
    source = resolve_encoder_weights(loaded, encoder_weights)
    identity = stored_identity(encoder_cfg, source)
    backbone = build_backbone(encoder_cfg, source).to(dev)
    gmacs = encoder_gmacs(backbone, loaded.preprocess)
    rows, skipped = [], []
    run_variant = _run_variant(runtime)
    run_encoder = None
    for variant in encoder_variants(dev, runtime.precision, openvino=openvino_version() is not None):
        _note(f"encoder {variant.label}, batch {runtime.batch_size}")
        try:
            encoder = build_variant_encoder(
                backbone, loaded, dev, variant, runtime.batch_size, runtime.encoder_cache, identity
            )
        except EncoderError as exc:  # e.g. int8 with no calibration photos named
            skipped.append({"variant": variant.label, "reason": str(exc)})
            _note(f"skipped {variant.label}: {exc}")
            continue
        limit = hardware_limit(gmacs, variant.precision, dev)
        rows.append(measure_encoder(encoder, loaded, dev, variant, runtime.batch_size, repeats, limit))
        if variant == run_variant:
            run_encoder = encoder
        else:
            del encoder
    sweep_rows = [r for r in rows if _variant(r) == run_variant]
    if sweep and run_encoder is not None:
        for bs in batch_size_sweep(runtime.batch_size, dev):
            if bs == runtime.batch_size:
                continue
            _note(f"encoder {run_variant.label}, batch {bs}")
            try:
                sweep_rows.append(
                    measure_encoder(
                        run_encoder,
                        loaded,
                        dev,
                        run_variant,
                        bs,
                        repeats,
                        hardware_limit(gmacs, run_variant.precision, dev),
                    )
                )
            except torch.cuda.OutOfMemoryError:
                break
    return backbone, {
        "encoder_gmacs_per_image": gmacs,
        "encoder": rows,
        "encoder_skipped": skipped,
        "batch_sizes": sorted(sweep_rows, key=lambda r: r["batch_size"]),
    }


def _ratios(rows: list[dict[str, Any]], same: list[dict[str, Any]], results: dict[str, Any]) -> dict[str, Any]:
    """The figures ``bench`` exists for: end to end against the bare encoder and the tutorial path."""
    enc = same[0]["images_per_s"] if same else None
    torch_bf16 = [r for r in rows if _variant(r) == Variant("bf16", True)]
    e2e, ref_rate = results["end_to_end"], results["reference"]["images_per_s"]
    return {
        "end_to_end_steady_vs_encoder": (e2e["steady_images_per_s"] / enc)
        if enc and e2e["steady_images_per_s"]
        else None,
        "end_to_end_whole_run_vs_encoder": e2e["whole_run_images_per_s"] / enc if enc else None,
        "end_to_end_whole_run_vs_reference": e2e["whole_run_images_per_s"] / ref_rate,
        "encoder_vs_fp32": {_label(r): r["images_per_s"] / rows[0]["images_per_s"] for r in rows},
        "encoder_vs_torch_bf16_channels_last": (enc / torch_bf16[0]["images_per_s"]) if enc and torch_bf16 else None,
    }


# -- output ------------------------------------------------------------------------------------
def _variant(row: dict[str, Any]) -> Variant:
    return Variant(row["precision"], row["channels_last"], row.get("backend", "torch"))


def _label(row: dict[str, Any]) -> str:
    return _variant(row).label


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def print_tables(results: dict[str, Any]) -> None:
    """The results as rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    m, s = results["machine"], results["settings"]
    load = ", ".join(f"{v:.1f}" for v in m["load_average"] or [])
    console.print(
        f"[bold]batchcap bench[/bold] on {m['host']}: {m.get('gpu') or m['cpu']}, "
        f"{m['cpus_usable']} CPUs usable, torch {m['torch']} with {m['torch_threads']} threads, "
        f"device {m['device']}; load average {load}"
    )
    src = s["source"]
    console.print(
        f"model {s['model_identity']}; {src['images']} pictures "
        f"({'generated ' + src['generated'] if 'generated' in src else src['folder']}); "
        f"median of {s['repeats']} runs after a warm-up"
    )
    rt = s["runtime"]
    console.print(
        f"run uses: backend {rt['backend']} ({rt['backend_note']}), {rt['precision']}, "
        f"batch {rt['batch_size']}, {rt['workers']} workers"
    )

    table = Table(
        title=f"Encoder alone (input on the device; {results['encoder_gmacs_per_image']:.3g} GMAC per picture)"
    )
    for col in ("backend + precision", "batch", "images/s", "vs torch fp32", "share of hardware limit"):
        table.add_column(col, justify="right" if col != "backend + precision" else "left")
    base = results["encoder"][0]["images_per_s"]
    chosen = Variant(rt["precision"], rt["channels_last"] if rt["backend"] == "torch" else False, rt["backend"])
    for row in results["encoder"] + [
        r for r in results["batch_sizes"] if r["batch_size"] != results["encoder"][0]["batch_size"]
    ]:
        share = row.get("share_of_limit")
        limit = f"{share:.0%} of {row['hardware_limit_images_per_s']:.1f}" if share else "—"
        mark = " (run)" if _variant(row) == chosen else ""
        table.add_row(
            _label(row) + mark,
            str(row["batch_size"]),
            _fmt(row["images_per_s"]),
            f"{row['images_per_s'] / base:.2f}x",
            limit,
        )
    console.print(table)
    if results.get("hardware_limit_assumption"):
        console.print(f"hardware limit assumes {results['hardware_limit_assumption']}: a peak, seldom reached")
    for skipped in results.get("encoder_skipped", []):
        console.print(f"skipped {skipped['variant']}: {skipped['reason']}")

    e2e, ref, dec = results["end_to_end"], results["reference"], results["decode"]
    loader, beam = results["loader"], results["beam"]
    ratios = results["ratios"]
    table = Table(title="Pipeline")
    table.add_column("stage")
    table.add_column("rate", justify="right")
    table.add_column("what was measured")
    table.add_row("decode + resize", f"{_fmt(dec['images_per_s'])} images/s", f"one process, {dec['images']} pictures")
    table.add_row(
        "loader", f"{_fmt(loader['images_per_s'])} images/s", f"{loader['workers']} workers, whole pass incl. start-up"
    )
    table.add_row(
        "beam search",
        f"{_fmt(beam['captions_per_s'])} captions/s",
        f"beam {beam['beam']}, batch {beam['batch_size']}, {beam['mean_words']:.1f} words on average",
    )
    table.add_row(
        "run, steady state",
        f"{_fmt(e2e['steady_images_per_s'])} images/s",
        f"(N - n) / (t(N) - t(n)), N={e2e['images']}, n={e2e['part_images']}; "
        f"{_fmt(ratios['end_to_end_steady_vs_encoder'], 2)} of the encoder alone",
    )
    table.add_row(
        "run, whole",
        f"{_fmt(e2e['whole_run_images_per_s'])} images/s",
        f"{e2e['whole_run_seconds']:.1f} s for {e2e['images']} incl. model load "
        f"(~{_fmt(e2e['startup_seconds'])} s start-up); "
        f"{_fmt(ratios['end_to_end_whole_run_vs_encoder'], 2)} of the encoder alone",
    )
    table.add_row(
        "tutorial-style",
        f"{_fmt(ref['images_per_s'], 2)} images/s",
        f"one picture per call, fp32, prefix re-run; run is "
        f"{_fmt(ratios['end_to_end_whole_run_vs_reference'])}x faster",
    )
    console.print(table)
    sug = results["suggested"]
    console.print(
        f"suggested: [bold]--batch-size {sug['batch_size']} --workers {sug['workers']}[/bold] "
        f"(encoder {sug['encoder_images_per_s']:,.1f} images/s needs about "
        f"{sug['workers_needed_to_keep_up']} decoding process(es) at "
        f"{dec['images_per_s']:,.1f} images/s each)"
    )
