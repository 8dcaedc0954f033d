"""Check batchcap on a GPU machine in one call of a few minutes, and write what it found.

A lent GPU machine is bare: PyTorch (CUDA), timm, torchvision, pyarrow, click, rich,
safetensors and Pillow, nothing downloadable. This script, run from the repository root,
goes through batchcap's CUDA paths with the command line only (so it survives changes to
the package's insides) and writes ``gpu_check.json`` and ``gpu_check.md`` under ``--out``:

1. install batchcap (``pip install --no-deps -e .``) and the wheels of ``--wheels DIR``;
2. the tests marked ``cuda`` (``python -m pytest -m cuda``);
3. ``batchcap bench`` on generated 224x224 and 500x375 JPEGs (and ``--images`` if given);
4. ``batchcap run`` on ``--count`` generated 500x375 JPEGs, with and without
   ``--decode-on-device``: images/s, and every input in the output exactly once;
5. a one-epoch ``batchcap train`` on a generated Flickr8k-style folder, then ``batchcap eval``.

Every step has a time limit and a failure is recorded, not fatal; the whole check keeps
to ``--budget`` seconds, and steps it no longer has time for are "skipped: budget". The
results are rewritten after every step, so a check killed from outside leaves what it had.

Fill the wheel folder on a machine with an index (batchcap imports webdataset and
braceexpand for shards and brace patterns, pycocoevalcap for train and eval; pytest,
pluggy, iniconfig, packaging, pygments (and on Python 3.10 exceptiongroup and tomli) run the tests;
setuptools and wheel build the editable install)::

    python tests/benchmarks/gpu_check.py --fill-wheels wheels            # pip download --no-deps ...
    python tests/benchmarks/gpu_check.py --fill-wheels wheels --slim     # 3 MB instead of 107 MB

then on the GPU machine, from the repository root::

    python tests/benchmarks/gpu_check.py --wheels wheels --out "$OUT"

Rehearse on a CPU with ``--device cpu --count 50`` (add ``--budget 1200``: Xception is slow
on a CPU; ``--model`` and ``--train-encoder`` make it small, as the test does).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
#: What batchcap needs beyond the GPU machine's packages, and what runs its tests.
#: Installed by name, so a package the machine already has is left as it is; pytest's own needs come last.
WHEELS = ("webdataset", "braceexpand", "pycocoevalcap", "pytest", "pluggy", "iniconfig", "packaging", "pygments")
#: pytest's on Python 3.10 only; downloaded as pure-Python wheels whatever Python fills the folder.
PY310_WHEELS = ("exceptiongroup", "tomli")
#: What must import after the install step.
IMPORTS = ("batchcap", "webdataset", "braceexpand", "pycocoevalcap.cider.cider", "pytest")
#: What pyproject.toml's build needs (pip builds the editable install from them, offline): a venv's own
#: setuptools may be too old (Python 3.11's 65.5 has no bdist_wheel without ``wheel``) or absent (3.12).
BUILD_WHEELS = ("setuptools", "wheel")
#: Java-only parts of pycocoevalcap (PTB tokenizer, METEOR, SPICE: 100 MB), left out by ``--slim``.
JAVA_PARTS = (
    "pycocoevalcap/spice/",
    "pycocoevalcap/meteor/data/",
    "pycocoevalcap/meteor/meteor-1.5.jar",
    "pycocoevalcap/tokenizer/stanford-corenlp-3.4.1.jar",
)
RUN_SIZE = (500, 375)  # Flickr/COCO-sized photos: decoding, not the encoder, is what differs


@dataclass
class Step:
    """One check: its limits, and once run, what it found."""

    name: str
    cap_s: float  # longest it may run
    floor_s: float  # not started with less than this left (kept for it by the steps before)
    status: str = "not run"  # ok | failed | skipped: why
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    detail: str = ""


@dataclass
class Proc:
    """A finished (or stopped) subprocess."""

    rc: int | None
    seconds: float
    stdout: str
    stderr: str
    timed_out: bool

    def tail(self, chars: int = 1500) -> str:
        """The end of stderr (else stdout): what a failure says."""
        text = (self.stderr or self.stdout).strip()
        return text[-chars:]


def run_cmd(cmd: list[str], timeout: float, env: dict[str, str], cwd: Path = REPO) -> Proc:
    """Run ``cmd`` with a time limit; past it, SIGTERM its process group (batchcap commits and exits 6),
    then SIGKILL 15 s later."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
        return Proc(proc.returncode, time.monotonic() - start, out, err, False)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return Proc(proc.returncode, time.monotonic() - start, out, err, True)


def failed(proc: Proc, what: str) -> str:
    """The status of a subprocess that did not do its job."""
    return (
        f"failed: {what} timed out after {proc.seconds:.0f} s" if proc.timed_out else f"failed: {what} exited {proc.rc}"
    )


# -- generated inputs -----------------------------------------------------------------------------
def photo_like_jpegs(
    folder: Path, count: int, size: tuple[int, int], seed: int = 0, distinct: int = 16, prefix: str = "img"
) -> list[Path]:
    """``count`` JPEGs of ``size`` that decode like photos (smooth colour plus grain, quality 90).

    Only ``distinct`` are encoded; the rest are byte copies under their own names, which
    decode at the same cost and are separate inputs to batchcap.
    """
    import io

    import numpy as np
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
        path = folder / f"{prefix}-{i:06d}.jpg"
        path.write_bytes(blobs[i % len(blobs)])
        paths.append(path)
    return paths


COLOURS = {
    "red": (200, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 200),
    "yellow": (230, 210, 30),
    "black": (15, 15, 15),
    "white": (240, 240, 240),
}
SHAPES = ("square", "circle")


def flickr8k_folder(root: Path, train: int, dev: int, size: int = 96, seed: int = 0) -> dict[str, int]:
    """A tiny dataset in Flickr8k's official layout whose captions say what the picture shows.

    Each photo is a coloured shape on a coloured ground, with five captions naming both,
    so one epoch is a real (if easy) training run rather than noise.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images, text = root / "Flicker8k_Dataset", root / "Flickr8k_text"
    images.mkdir(parents=True, exist_ok=True)
    text.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    tokens, splits = [], {"train": [], "dev": [], "test": []}
    for i in range(train + dev):
        ground, colour = rng.choice(len(names), size=2, replace=False)
        shape = SHAPES[i % 2]
        picture = Image.new("RGB", (size, size), COLOURS[names[ground]])
        box = [int(v) for v in rng.integers(size // 8, size // 3, size=2)] + [
            int(v) for v in rng.integers(2 * size // 3, 7 * size // 8, size=2)
        ]
        draw = ImageDraw.Draw(picture)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[names[colour]])
        name = f"{1000000 + i}_{seed:04x}.jpg"
        picture.save(images / name, quality=90)
        said = [
            f"a {names[colour]} {shape} on a {names[ground]} background",
            f"a {names[colour]} {shape}",
            f"the {shape} is {names[colour]}",
            f"a {shape} in {names[colour]} on {names[ground]}",
            f"a {names[ground]} picture with a {names[colour]} {shape}",
        ]
        tokens += [f"{name}#{n}\t{caption}" for n, caption in enumerate(said)]
        splits["train" if i < train else "dev"].append(name)
    (text / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    for split, listed in splits.items():
        (text / f"Flickr_8k.{split}Images.txt").write_text("".join(f"{n}\n" for n in listed), encoding="utf-8")
    return {"train": train, "dev": dev}


def random_encoder_weights(name: str, path: Path) -> Path:
    """A random-weight timm encoder saved as safetensors: a pipeline check offline, not a captioner."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def packaged_xception_weights() -> Path | None:
    """The Keras Xception weights that ship in the package (found by file name, wherever they live)."""
    found = sorted((REPO / "batchcap").rglob("legacy_xception*.safetensors"))
    return found[0] if found else None


# -- wheels -----------------------------------------------------------------------------------------
def fill_wheels(folder: Path, slim: bool) -> None:
    """``pip download`` the wheels a bare GPU machine lacks; ``slim`` drops pycocoevalcap's Java parts."""
    folder.mkdir(parents=True, exist_ok=True)
    download = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(folder)]
    subprocess.run([*download, *WHEELS, *BUILD_WHEELS], check=True)
    subprocess.run(
        [
            *download,
            "--python-version",
            "3.10",
            "--implementation",
            "py",
            "--abi",
            "none",
            "--platform",
            "any",
            *PY310_WHEELS,
        ],
        check=True,
    )
    if slim:
        for wheel in folder.glob("pycocoevalcap-*.whl"):
            slim_wheel(wheel)
    for wheel in sorted(folder.iterdir()):
        print(f"{wheel.stat().st_size / 1e6:8.1f} MB  {wheel.name}")


def slim_wheel(wheel: Path) -> None:
    """Rewrite ``wheel`` without :data:`JAVA_PARTS` (BLEU, ROUGE-L and CIDEr are pure Python).

    batchcap uses them only with ``java`` on the PATH, and the check hides ``java`` from
    ``eval`` when they are absent, so the scores stay what batchcap reports without Java.
    """
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.startswith(JAVA_PARTS):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(
                    line + b"\n"
                    for line in data.splitlines()
                    if not line.startswith(tuple(p.encode() for p in JAVA_PARTS))
                )
            dst.writestr(item, data)
    os.replace(tmp, wheel)


# -- the check --------------------------------------------------------------------------------------
class Check:
    """The steps, their shared inputs and the deadline they all keep to."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.cuda = args.device.startswith("cuda")
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
        self.env["BATCHCAP_ENCODER_CACHE"] = str(work / "encoder-cache")  # converted encoders stay in work/
        self.env["PYTHONUNBUFFERED"] = "1"
        self.environment: dict[str, Any] = {}
        self.run_images: list[Path] = []
        self.dataset: Path | None = None
        self.trained: Path | None = None
        self.train_weights: Path | None = None
        self.steps = [
            Step("install", 90, 15, status="skipped: --skip-install" if args.skip_install else "not run"),
            Step("cuda-tests", 150, 20),
            Step("prepare-inputs", 60, 5),
            Step("bench-224x224", 90, 30),
            Step("bench-500x375", 90, 30),
            Step("bench-photos", 75, 30, status="not run" if args.images else "skipped: no --images"),
            Step("run", 75, 20),
            Step(
                "run-decode-on-device",
                75,
                20,
                status="not run" if self.cuda else "skipped: --decode-on-device needs a CUDA device",
            ),
            Step("train", 90, 30),
            Step("eval", 60, 15),
        ]
        if args.only:
            unknown = set(args.only) - {s.name for s in self.steps}
            if unknown:
                raise SystemExit(
                    f"--only: no step {', '.join(sorted(unknown))} (steps: {', '.join(s.name for s in self.steps)})"
                )
            for s in self.steps:
                if s.name not in args.only and s.status == "not run":
                    s.status = "skipped: not in --only"

    # -- plumbing
    def batchcap(self, *args: str) -> list[str]:
        """``python -m batchcap ARGS``: the command line, as a user runs it."""
        return [sys.executable, "-m", "batchcap", *args]

    def speed_model(self) -> list[str]:
        """--model / --encoder-weights for bench and run, when a model other than the packaged one is asked for."""
        opts = ["--model", str(self.args.model)] if self.args.model else []
        return opts + (["--encoder-weights", str(self.args.encoder_weights)] if self.args.encoder_weights else [])

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def execute(self) -> None:
        """Run every step in order within the budget, writing the results after each."""
        self.environment = self.describe_environment()
        self.write()
        for index, step in enumerate(self.steps):
            if step.status != "not run":  # skipped before it started
                self.write()
                continue
            reserve = sum(s.floor_s for s in self.steps[index + 1 :] if s.status == "not run")
            limit = min(step.cap_s * self.args.cap_scale, self.remaining() - reserve)
            if limit < step.floor_s:
                step.status = "skipped: budget"
                self.write()
                continue
            print(f"gpu_check: {step.name} (up to {limit:.0f} s)", file=sys.stderr, flush=True)
            start = time.monotonic()
            try:
                step.status = getattr(self, "step_" + step.name.replace("-", "_"))(step, limit)
            except Exception:  # noqa: BLE001 -- a bug in this script's step: recorded, and the next step still runs
                step.status = "failed: error in gpu_check"
                step.detail = traceback.format_exc()[-2000:]
            step.seconds = round(time.monotonic() - start, 1)
            print(f"gpu_check: {step.name}: {step.status} ({step.seconds} s)", file=sys.stderr, flush=True)
            self.write()

    def describe_environment(self) -> dict[str, Any]:
        """Device, versions and Java, from a subprocess (this process never touches CUDA)."""
        probe = (
            "import json, platform, torch, torchvision, timm\n"
            "cuda = torch.cuda.is_available()\n"
            "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__,\n"
            "  'torchvision': torchvision.__version__, 'timm': timm.__version__,\n"
            "  'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(),\n"
            "  'cuda_available': cuda, 'gpu_count': torch.cuda.device_count(),\n"
            "  'device_name': torch.cuda.get_device_name() if cuda else platform.processor() or 'cpu',\n"
            "  'compute_capability': '.'.join(map(str, torch.cuda.get_device_capability())) if cuda else None,\n"
            "  'gpu_memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)\n"
            "      if cuda else None}))\n"
        )
        proc = run_cmd([sys.executable, "-c", probe], 60, self.env)
        info: dict[str, Any] = {
            "requested_device": self.args.device,
            "cpu_count": os.cpu_count(),
            "java": shutil.which("java"),
            "budget_s": self.args.budget,
        }
        try:
            info.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            info["probe_error"] = proc.tail(500)
        if self.cuda and not info.get("cuda_available"):
            info["warning"] = "--device cuda asked for, but torch sees no CUDA device: the CUDA steps will fail"
        return info

    # -- steps: each returns its status and fills step.figures / step.detail
    def step_install(self, step: Step, limit: float) -> str:
        """batchcap without dependencies (editable), then the wheels, then check the imports.

        With ``--wheels`` pip builds batchcap in its usual isolated environment from the
        folder's setuptools and wheel; without, from the ones installed here.
        """
        end = time.monotonic() + limit
        pip = [sys.executable, "-m", "pip", "install", "--no-input", "--disable-pip-version-check", "--no-deps"]
        wheels = self.args.wheels
        offline = ["--no-index", "--find-links", str(wheels)] if wheels else ["--no-build-isolation"]
        proc = run_cmd([*pip, *offline, "-e", "."], end - time.monotonic(), self.env)
        step.figures["editable_install"] = "ok" if proc.rc == 0 else "failed"
        notes = (
            []
            if proc.rc == 0
            else [
                (
                    f"pip install -e . exited {proc.rc} (batchcap still runs from the "
                    f"repository through PYTHONPATH): {proc.tail(600)}"
                )
            ]
        )
        if wheels:
            have = {p.name.split("-")[0].lower() for p in Path(wheels).glob("*.whl")}
            wanted = WHEELS + (PY310_WHEELS if sys.version_info < (3, 11) else ())
            names = [name for name in wanted if name in have]  # by name: the build wheels stay out of this env
            proc = run_cmd([*pip, "--no-index", "--find-links", str(wheels), *names], end - time.monotonic(), self.env)
            step.figures["wheels"] = names
            if proc.rc != 0:
                notes.append(f"wheels: {failed(proc, 'pip install')}: {proc.tail(600)}")
        probe = (
            "import importlib, json\n"
            "def bad(m):\n"
            "    try:\n"
            "        importlib.import_module(m)\n"
            "    except Exception as e:\n"
            "        return f'{m} ({e.__class__.__name__}: {e})'\n"
            f"print(json.dumps([b for b in map(bad, {IMPORTS!r}) if b]))"
        )
        proc = run_cmd([sys.executable, "-c", probe], max(5.0, end - time.monotonic()), self.env)
        missing = json.loads(proc.stdout.strip() or "null") if proc.rc == 0 else ["(probe failed)"]
        step.figures["missing"] = missing
        step.detail = "\n".join(notes)
        if missing:
            return f"failed: not importable: {', '.join(missing)}"
        return "ok" if not notes else "failed: " + "; ".join(n.split(":")[0] for n in notes)

    def step_cuda_tests(self, step: Step, limit: float) -> str:
        """``pytest -m cuda`` over the test files that have such tests (the others may need more packages)."""
        files = sorted(
            {
                str(p.relative_to(REPO))
                for p in (REPO / "tests").rglob("test_*.py")
                if "mark.cuda" in p.read_text(encoding="utf-8")
            }
            - {"tests/tools/test_gpu_check.py"}
        )
        junit = self.work / "cuda-tests.xml"
        proc = run_cmd(
            [
                sys.executable,
                "-m",
                "pytest",
                "-m",
                "cuda",
                "-p",
                "no:cacheprovider",
                "-q",
                f"--junitxml={junit}",
                *files,
            ],
            limit,
            self.env,
        )
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        if junit.exists():
            root = ET.parse(junit).getroot()
            for suite in root.iter("testsuite"):
                for key in counts:
                    counts[key] += int(suite.get(key, 0))
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        step.figures = {**counts, "files": len(files), "pytest_exit": proc.rc}
        if proc.timed_out or counts["failures"] or counts["errors"] or proc.rc not in (0, 5):
            bad = [
                f"{case.get('classname')}::{case.get('name')}"
                for case in (ET.parse(junit).getroot().iter("testcase") if junit.exists() else [])
                if case.find("failure") is not None or case.find("error") is not None
            ]
            step.detail = ("\n".join(bad) + "\n" + proc.stdout[-1500:]).strip()
            return failed(proc, "pytest") if proc.timed_out or not bad else f"failed: {len(bad)} tests"
        if counts["passed"] == 0:
            return f"skipped: no CUDA tests ran ({counts['skipped']} skipped: no CUDA device)"
        return "ok"

    def step_prepare_inputs(self, step: Step, limit: float) -> str:
        """The JPEGs for ``run`` and the Flickr8k-style folder for ``train`` and ``eval``."""
        self.run_images = photo_like_jpegs(self.work / "run-images", self.args.count, RUN_SIZE)
        dev = max(4, self.args.train_images // 4)
        self.dataset = self.work / "flickr8k-tiny"
        split = flickr8k_folder(self.dataset, self.args.train_images, dev)
        megabytes = sum(p.stat().st_size for p in self.run_images) / 1e6
        step.figures = {
            "run_images": len(self.run_images),
            "run_size": "x".join(map(str, RUN_SIZE)),
            "run_megabytes": round(megabytes, 1),
            "train_images": split["train"],
            "dev_images": split["dev"],
        }
        return "ok"

    def bench(self, step: Step, limit: float, *source: str) -> str:
        """``batchcap bench --json`` and the figures that size jobs."""
        proc = run_cmd(
            self.batchcap(
                "bench",
                *source,
                "--json",
                "--device",
                self.args.device,
                "--repeats",
                str(self.args.repeats),
                *self.speed_model(),
            ),
            limit,
            self.env,
        )
        if proc.rc != 0:
            step.detail = proc.tail()
            return failed(proc, "batchcap bench")
        result = json.loads(proc.stdout)
        runtime = result["settings"]["runtime"]
        encoder = {
            f"{r['backend']} {r['precision']}{'+cl' if r['channels_last'] else ''}": round(r["images_per_s"], 1)
            for r in result["encoder"]
        }
        e2e = result["end_to_end"]
        step.figures = {
            "images": result["settings"]["source"]["images"],
            "run_uses": f"{runtime['backend']} {runtime['precision']} batch {runtime['batch_size']} "
            f"workers {runtime['workers']}",
            "encoder_images_per_s": encoder,
            "batch_sweep_images_per_s": {r["batch_size"]: round(r["images_per_s"], 1) for r in result["batch_sizes"]},
            "peak_memory_mib": max((r.get("peak_memory_mib") or 0 for r in result["batch_sizes"]), default=None),
            "decode_images_per_s_one_process": round(result["decode"]["images_per_s"], 1),
            "loader_images_per_s": round(result["loader"]["images_per_s"], 1),
            "beam_captions_per_s": round(result["beam"]["captions_per_s"], 1),
            "end_to_end_whole_run_images_per_s": round(e2e["whole_run_images_per_s"], 1),
            "end_to_end_steady_images_per_s": round(e2e["steady_images_per_s"], 1)
            if e2e.get("steady_images_per_s")
            else None,
            "reference_images_per_s": round(result["reference"]["images_per_s"], 2),
            "suggested": result["suggested"],
            "skipped_variants": [s["variant"] for s in result.get("encoder_skipped", [])],
        }
        return "ok"

    def step_bench_224x224(self, step: Step, limit: float) -> str:
        return self.bench(step, limit, "--count", str(self.args.bench_count), "--size", "224x224")

    def step_bench_500x375(self, step: Step, limit: float) -> str:
        return self.bench(step, limit, "--count", str(self.args.bench_count), "--size", "500x375")

    def step_bench_photos(self, step: Step, limit: float) -> str:
        return self.bench(step, limit, str(self.args.images), "--count", str(self.args.bench_count))

    def caption_run(self, step: Step, limit: float, *extra: str) -> str:
        """``batchcap run`` over the generated JPEGs: images/s, and every input in the output exactly once."""
        if not self.run_images:
            return "skipped: no inputs (prepare-inputs failed)"
        folder = self.run_images[0].parent
        out = self.work / f"{step.name}.parquet"
        proc = run_cmd(
            self.batchcap(
                "run",
                str(folder),
                "--out",
                str(out),
                "--overwrite",
                "--device",
                self.args.device,
                "--log-every",
                "10",
                *self.speed_model(),
                *extra,
            ),
            limit,
            self.env,
        )
        step.figures = {
            "images": len(self.run_images),
            "seconds": round(proc.seconds, 1),
            "images_per_s": round(len(self.run_images) / proc.seconds, 1),
            "exit": proc.rc,
        }
        if proc.rc != 0:
            step.detail = proc.tail()
            return failed(proc, "batchcap run")
        import pyarrow.parquet as pq

        table = pq.read_table(out, columns=["id", "status"])
        ids = table.column("id").to_pylist()
        expected = {p.relative_to(folder).as_posix() for p in self.run_images}
        statuses: dict[str, int] = {}
        for status in table.column("status").to_pylist():
            statuses[status] = statuses.get(status, 0) + 1
        duplicates = len(ids) - len(set(ids))
        missing, extra_ids = expected - set(ids), set(ids) - expected
        step.figures.update(
            {
                "rows": len(ids),
                "statuses": statuses,
                "duplicates": duplicates,
                "missing": len(missing),
                "unexpected": len(extra_ids),
            }
        )
        summary = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if ":" in line][-12:]
        said = re.search(r"images in [\d.]+s \(([\d.,]+) images/s\)", proc.stderr + proc.stdout)
        if said:  # batchcap's own rate: from its start of captioning, without Python's and torch's start-up
            step.figures["batchcap_images_per_s"] = float(said.group(1).replace(",", ""))
        step.detail = "\n".join(summary)
        if duplicates or missing or extra_ids:
            step.detail = f"missing e.g. {sorted(missing)[:3]}, unexpected e.g. {sorted(extra_ids)[:3]}\n" + step.detail
            return (
                f"failed: output is not every input once ({duplicates} duplicates, {len(missing)} missing, "
                f"{len(extra_ids)} unexpected)"
            )
        if statuses.get("ok", 0) != len(expected):
            return f"failed: {len(expected) - statuses.get('ok', 0)} inputs not captioned ({statuses})"
        return "ok"

    def step_run(self, step: Step, limit: float) -> str:
        return self.caption_run(step, limit)

    def step_run_decode_on_device(self, step: Step, limit: float) -> str:
        return self.caption_run(step, limit, "--decode-on-device")

    def step_train(self, step: Step, limit: float) -> str:
        """One epoch on the generated folder: feature extraction, a training pass, a validation."""
        if self.dataset is None:
            return "skipped: no dataset (prepare-inputs failed)"
        name = self.args.train_encoder
        if name == "legacy_xception":
            self.train_weights = self.args.encoder_weights or packaged_xception_weights()
            if self.train_weights is None:
                return "failed: no legacy_xception*.safetensors in the package: pass --encoder-weights"
        else:
            self.train_weights = random_encoder_weights(name, self.work / f"{name}-random.safetensors")
        out = self.work / "train" / "tiny.safetensors"
        size = ["--input-size", str(self.args.train_input_size)] if self.args.train_input_size else []
        proc = run_cmd(
            self.batchcap(
                "train",
                str(self.dataset),
                "--out",
                str(out),
                "--device",
                self.args.device,
                "--encoder",
                name,
                "--encoder-weights",
                str(self.train_weights),
                *size,
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--warmup-steps",
                "0",
                "--min-word-count",
                "1",
                "--embed-dim",
                "64",
                "--hidden-dim",
                "128",
                "--attention-dim",
                "64",
                "--max-caption-len",
                "12",
                "--cache-dir",
                str(self.work / "train" / "features"),
            ),
            limit,
            self.env,
        )
        if proc.rc != 0:
            step.detail = proc.tail()
            return failed(proc, "batchcap train")
        result = json.loads(proc.stdout)
        self.trained = Path(result["model"])
        metrics = result.get("metrics") or {}
        step.figures = {
            "encoder": name,
            "images_per_epoch": self.args.train_images,
            **{
                k: (round(v, 4) if isinstance(v, float) else v)
                for k, v in metrics.items()
                if not isinstance(v, (dict, list))
            },
        }
        step.detail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        return "ok"

    def step_eval(self, step: Step, limit: float) -> str:
        """``batchcap eval`` of the trained model on the dev split; records what batchcap does without Java."""
        if self.trained is None or self.dataset is None:
            return "skipped: no trained model (train failed or was skipped)"
        env = dict(self.env)
        java = shutil.which("java", path=env.get("PATH"))
        note = (
            "java on PATH: PTB tokenizer and METEOR"
            if java
            else "no java: batchcap scores with its own tokenizer and reports METEOR as n/a (not an error)"
        )
        if java and not self.java_parts_present():
            env["PATH"] = os.pathsep.join(
                d for d in env.get("PATH", "").split(os.pathsep) if not (Path(d) / "java").exists()
            )
            note = "java hidden from eval: pycocoevalcap was installed without its Java parts (--slim wheel)"
        scores = self.work / "eval.json"
        proc = run_cmd(
            self.batchcap(
                "eval",
                str(self.dataset),
                "--split",
                "val",
                "--model",
                str(self.trained),
                "--encoder-weights",
                str(self.train_weights),
                "--device",
                self.args.device,
                "--json",
                str(scores),
            ),
            limit,
            env,
        )
        step.figures = {"java": bool(java), "java_note": note}
        if proc.rc != 0:
            step.detail = proc.tail()
            return failed(proc, "batchcap eval")
        result = json.loads(scores.read_text())
        numbers = {
            **result.get("scores", {}),
            "images": result.get("images"),
            "seconds": result.get("seconds"),
            "failed": len(result.get("failed") or {}),
        }
        step.figures.update(
            {
                k: (round(v, 4) if isinstance(v, float) else v)
                for k, v in numbers.items()
                if k in ("images", "failed", "seconds", "tokenizer", "BLEU-4", "CIDEr", "ROUGE-L", "METEOR", "note")
            }
        )
        return "ok"

    def java_parts_present(self) -> bool:
        """Whether the installed pycocoevalcap has its PTB tokenizer jar (a --slim wheel has not)."""
        probe = (
            "import importlib.util as u, pathlib\n"  # a namespace package: no __init__, no origin
            "s = u.find_spec('pycocoevalcap')\n"
            "print(any((pathlib.Path(d) / 'tokenizer' / 'stanford-corenlp-3.4.1.jar').exists()\n"
            "          for d in ((s.submodule_search_locations or []) if s else [])))"
        )
        return run_cmd([sys.executable, "-c", probe], 30, self.env).stdout.strip() == "True"

    # -- results
    def write(self) -> None:
        """``gpu_check.json`` and ``gpu_check.md`` under --out, replaced whole (never half-written)."""
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        elapsed = round(time.monotonic() - self.started, 1)
        doc = {
            "environment": self.environment,
            "elapsed_s": elapsed,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
            "steps": [asdict(s) for s in self.steps],
        }
        for name, text in (
            ("gpu_check.json", json.dumps(doc, indent=2, default=str) + "\n"),
            ("gpu_check.md", self.markdown(elapsed)),
        ):
            tmp = out / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, out / name)

    def markdown(self, elapsed: float) -> str:
        """One table: step, status, seconds, the figures that matter."""
        env = self.environment
        lines = [
            f"# batchcap GPU check: {env.get('device_name', '?')}",
            "",
            (
                f"torch {env.get('torch')} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}), torchvision "
                f"{env.get('torchvision')}, timm {env.get('timm')}, Python {env.get('python')}; "
                f"device `{self.args.device}`, {env.get('gpu_memory_gib') or '-'} GiB, compute capability "
                f"{env.get('compute_capability') or '-'}; {env.get('cpu_count')} CPUs; java: "
                f"{'yes' if env.get('java') else 'no'}. {elapsed:.0f} s of a {self.args.budget:.0f} s budget."
            ),
            "",
            "| step | status | seconds | key figures |",
            "|---|---|---:|---|",
        ]
        for s in self.steps:
            lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {key_figures(s)} |")
        if env.get("warning"):
            lines += ["", f"**{env['warning']}**"]
        return "\n".join(lines) + "\n"


def key_figures(step: Step) -> str:
    """The few numbers of a step worth a table cell."""
    f = step.figures
    if not f:
        return ""
    if step.name.startswith("bench") and "encoder_images_per_s" in f:
        best = max(f["encoder_images_per_s"].items(), key=lambda kv: kv[1])
        return (
            f"{f['run_uses']}; encoder best {best[0]} {best[1]:,.0f} img/s; end to end "
            f"{f['end_to_end_whole_run_images_per_s']:,.0f} img/s (steady "
            f"{f['end_to_end_steady_images_per_s'] or 0:,.0f}); decode {f['decode_images_per_s_one_process']:,.0f}"
            f" img/s/process; beam {f['beam_captions_per_s']:,.0f} captions/s; suggested batch "
            f"{f['suggested'].get('batch_size')} workers {f['suggested'].get('workers')}"
        )
    if step.name.startswith("run") and "images_per_s" in f:
        text = f"{f['images']} images, {f['images_per_s']:,.1f} img/s whole command"
        if f.get("batchcap_images_per_s"):
            text += f" ({f['batchcap_images_per_s']:,.1f} by batchcap's summary)"
        if "rows" in f:
            text += (
                f"; {f['rows']} rows, {f['duplicates']} duplicates, {f['missing']} missing, statuses {f['statuses']}"
            )
        return text
    if step.name == "cuda-tests":
        return (
            f"{f['passed']} passed, {f['failures']} failed, {f['errors']} errors, {f['skipped']} skipped "
            f"({f['files']} files)"
        )
    if step.name == "eval":
        keys = ("images", "tokenizer", "BLEU-4", "CIDEr", "METEOR")
        return "; ".join(f"{k} {f[k]}" for k in keys if k in f) + f"; {f.get('java_note', '')}"
    if step.name == "train":
        return "; ".join(f"{k} {v}" for k, v in f.items())[:300]
    return "; ".join(f"{k} {v}" for k, v in f.items())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=os.environ.get("OUT"),
        help="Folder for gpu_check.json and gpu_check.md [default: $OUT].",
    )
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu to rehearse [default: cuda].")
    parser.add_argument(
        "--count", type=int, default=None, help="Generated 500x375 JPEGs for `run` [default: 3000 on CUDA, 50 on CPU]."
    )
    parser.add_argument(
        "--bench-count", type=int, default=None, help="Pictures per `bench` [default: 1024 on CUDA, 8 on CPU]."
    )
    parser.add_argument("--repeats", type=int, default=None, help="bench --repeats [default: 3 on CUDA, 1 on CPU].")
    parser.add_argument(
        "--train-images",
        type=int,
        default=None,
        help="Generated training pictures (a quarter as many dev) [default: 256 on CUDA, 32 on CPU].",
    )
    parser.add_argument("--budget", type=float, default=480.0, help="Seconds for the whole check [default: 480].")
    parser.add_argument(
        "--cap-scale",
        type=float,
        default=1.0,
        help="Multiply every step's own time limit (a slow CPU rehearsal needs more).",
    )
    parser.add_argument("--wheels", type=Path, default=None, help="Folder of wheels to install (--no-index).")
    parser.add_argument("--skip-install", action="store_true", help="batchcap and its dependencies are installed.")
    parser.add_argument("--images", type=Path, default=None, help="A folder of real photos to bench as well.")
    parser.add_argument("--model", type=Path, default=None, help="Model for bench and run [default: the packaged one].")
    parser.add_argument(
        "--encoder-weights",
        type=Path,
        default=None,
        help="Encoder weights for --model, and for training legacy_xception [default: packaged].",
    )
    parser.add_argument(
        "--train-encoder",
        default="legacy_xception",
        help="timm encoder to train with; other than legacy_xception gets random weights (rehearsal).",
    )
    parser.add_argument("--train-input-size", type=int, default=None, help="train --input-size.")
    parser.add_argument(
        "--only",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        default=None,
        metavar="STEP,..",
        help="Run only these steps (e.g. to rerun one that failed); "
        "steps whose inputs come from another (run needs prepare-inputs, eval needs train) need it too.",
    )
    parser.add_argument("--work", type=Path, default=None, help="Scratch folder [default: a temporary one, removed].")
    parser.add_argument(
        "--fill-wheels",
        type=Path,
        default=None,
        metavar="DIR",
        help="Only download the wheels a bare GPU machine needs into DIR, and stop.",
    )
    parser.add_argument(
        "--slim",
        action="store_true",
        help="With --fill-wheels: pycocoevalcap without its Java parts (15 KB, not 104 MB).",
    )
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.count = args.count or (3000 if cuda else 50)
    args.bench_count = args.bench_count or (1024 if cuda else 8)
    args.repeats = args.repeats or (3 if cuda else 1)
    args.train_images = args.train_images or (256 if cuda else 32)
    if args.fill_wheels is None and args.out is None:
        parser.error("give --out DIR or set $OUT")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fill_wheels is not None:
        fill_wheels(args.fill_wheels, args.slim)
        return 0
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        check = Check(args, args.work.resolve())
        check.execute()
    else:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            check = Check(args, Path(tmp))
            check.execute()
    print(Path(args.out, "gpu_check.md").read_text(encoding="utf-8"))
    return 1 if any(s.status.startswith("failed") for s in check.steps) else 0


if __name__ == "__main__":
    sys.exit(main())
