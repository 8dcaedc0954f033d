"""The ``batchcap`` command line: a thin click layer over the library.

Every command builds frozen config objects from its options and hands them to one
library function. Option bundles shared between commands are decorators. User errors
(bad options, a missing source, a file that is not a model) become one-line messages
with exit code 2; bugs stay tracebacks (exit 1), so the two are never confused.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from batchcap.config import DEFAULT_CONSENSUS_WEIGHT, NEIGHBOURS_K
from batchcap.version import __version__

F = Callable[..., Any]

# Exceptions that carry a user-facing message (imported lazily: heavy modules).
_USER_ERRORS: tuple[type[BaseException], ...] | None = None


def _user_errors() -> tuple[type[BaseException], ...]:
    global _USER_ERRORS
    if _USER_ERRORS is None:
        from batchcap.data.captions.records import DatasetError
        from batchcap.data.sources import SourceError
        from batchcap.encode.weights import EncoderError
        from batchcap.hardware import HardwareError
        from batchcap.model.ensemble import EnsembleError
        from batchcap.model.modelfile import ModelFileError
        from batchcap.outputs.lock import OutputUnwritable
        from batchcap.outputs.merge import MergeError
        from batchcap.outputs.report import ReportError
        from batchcap.tools.average import AverageError
        from batchcap.training.driver import TrainingError
        from batchcap.training.feature_cache import FeatureSpaceError
        from batchcap.training.metrics import MetricsUnavailable

        _USER_ERRORS = (
            ModelFileError,
            EncoderError,
            HardwareError,
            SourceError,
            DatasetError,
            MergeError,
            ReportError,
            TrainingError,
            AverageError,
            EnsembleError,
            MetricsUnavailable,
            OutputUnwritable,
            FeatureSpaceError,
        )
    return _USER_ERRORS


class InputError(click.ClickException):
    """The command cannot run as given (exit 2); exit 1 stays "crash"."""

    exit_code = 2


def user_errors(func: F) -> F:
    """Turn library errors that describe bad input into clean messages, not tracebacks."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from batchcap.config import OptionError

        try:
            return func(*args, **kwargs)
        except OptionError as exc:
            raise click.BadParameter(exc.message, param_hint=exc.option) from None
        except Exception as exc:  # not BaseException: an interrupt must pass without importing anything
            # Importing the error classes loads torch; done only here, once an error is in hand, so
            # a signal that cut ``import torch`` short never re-enters the half-imported module.
            if not isinstance(exc, _user_errors()):
                raise
            raise InputError(str(exc)) from exc

    return wrapper


def interruptible(func: F) -> F:
    """Ctrl-C or SIGTERM before ``run_job`` takes the signals over: one line and exit 6, not ``Aborted!``."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import signal

        from batchcap.pipeline.interrupt import STOP_SIGNALS, forget_startup_signal, startup_signal
        from batchcap.pipeline.progress import EXIT_INTERRUPTED

        previous = {signum: signal.signal(signum, startup_signal) for signum in STOP_SIGNALS}
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("batchcap: interrupted before captioning began; nothing was written", err=True)
            sys.exit(EXIT_INTERRUPTED)
        finally:
            forget_startup_signal()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    return wrapper


# -- option bundles --------------------------------------------------------------------------
def model_options(func: F) -> F:
    """--model and --encoder-weights: which model file, and where its encoder weights are."""
    func = click.option(
        "--encoder-weights",
        type=click.Path(dir_okay=False),
        envvar="BATCHCAP_ENCODER_WEIGHTS",
        default=None,
        show_envvar=True,
        help="Encoder weights (safetensors or weights-only torch file), when the model "
        "file neither embeds nor ships them.",
    )(func)
    func = click.option(
        "--model",
        "model",
        type=click.Path(dir_okay=False),
        default=None,
        help="Model file (.safetensors from `batchcap train`). Default: the model shipped with batchcap.",
    )(func)
    return func


def runtime_options(func: F) -> F:
    """--device, --precision, --batch-size, --workers: how the tensors are computed."""
    func = click.option(
        "--workers", default="auto", show_default=True, help="Decoding worker processes (a number, or auto)."
    )(func)
    func = click.option(
        "--batch-size",
        type=click.IntRange(1, 65536),
        default=None,
        help="Images per encoder batch [default: 16 on CPU, where it measured fastest; 256 on CUDA].",
    )(func)
    func = click.option(
        "--precision",
        type=click.Choice(["auto", "fp32", "bf16", "fp16", "int8"]),
        default="auto",
        show_default=True,
        help="auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32. "
        "int8: OpenVINO backend only.",
    )(func)
    func = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(func)
    return func


def backend_options(func: F) -> F:
    """--backend and --encoder-cache: which engine runs the encoder, and where converted encoders are kept."""
    func = click.option(
        "--encoder-cache",
        type=click.Path(file_okay=False),
        envvar="BATCHCAP_ENCODER_CACHE",
        default=None,
        show_envvar=True,
        help="Folder of converted (OpenVINO) encoders, shared safely by concurrent jobs "
        "[default: $XDG_CACHE_HOME/batchcap, else ~/.cache/batchcap].",
    )(func)
    func = click.option(
        "--backend",
        type=click.Choice(["auto", "torch", "openvino"]),
        default="auto",
        show_default=True,
        help="Encoder engine. auto: OpenVINO on CPU when installed (falls back to torch, and says so), torch on CUDA.",
    )(func)
    return func


def beam_options(func: F) -> F:
    """Caption search settings, shared by run, eval, calibrate and bench."""
    func = click.option(
        "--consensus-weight",
        type=float,
        default=None,
        help="Rerank the search's captions by mean log-probability + W x their agreement (CIDEr-D) with what "
        "people wrote for the picture's nearest training pictures; 0: keep the search's order. "
        f"[default: {DEFAULT_CONSENSUS_WEIGHT} for a model with neighbour statistics, else 0]",
    )(func)
    func = click.option(
        "--style",
        default="auto",
        show_default=True,
        help="Models trained with --dataset-styles: the caption style to write (a training dataset's name, as "
        "`batchcap info` lists them), or auto: each picture the style of most of its nearest training pictures.",
    )(func)
    func = click.option(
        "--allow-repeated-words",
        is_flag=True,
        help="Let any word follow itself. Default: only the words the model learnt may ('yo yo').",
    )(func)
    func = click.option(
        "--no-ending-rule",
        is_flag=True,
        help="Let captions end on any word. Default: never on a word like 'a' or 'of', nor on 'a black'.",
    )(func)
    func = click.option(
        "--n-best",
        type=click.IntRange(1),
        default=1,
        show_default=True,
        help="Captions returned per image (with scores); at most --beam.",
    )(func)
    func = click.option(
        "--no-repeat-ngram",
        type=click.IntRange(0),
        default=0,
        show_default=True,
        help="Forbid repeating any n-gram of this size (0: off).",
    )(func)
    func = click.option(
        "--length-penalty",
        type=float,
        default=0.0,
        show_default=True,
        help="ALPHA in score = log p / length**ALPHA (0: raw log-probability).",
    )(func)
    func = click.option(
        "--min-len", type=click.IntRange(0), default=1, show_default=True, help="Fewest words before <end> is allowed."
    )(func)
    func = click.option(
        "--max-len", type=click.IntRange(1), default=None, help="Most words per caption. Default: the model's maximum."
    )(func)
    func = click.option(
        "--beam", type=click.IntRange(1), default=3, show_default=True, help="Beam width (1 = greedy)."
    )(func)
    return func


def input_options(func: F) -> F:
    """How inputs are found and decoded."""
    func = click.option(
        "--id-column",
        default=None,
        help="Parquet tables: the column of ids [default: key if present, else id, else FILE/ROW]. "
        "A --files-from manifest: the column whose value is each row's id, verbatim, so captions join back "
        "[default: none, the path is the id]. A resume setting.",
    )(func)
    func = click.option(
        "--image-key",
        default="jpg,jpeg,png,webp",
        show_default=True,
        help="WebDataset: extensions to take the image from; Parquet: the bytes column. First present wins.",
    )(func)
    func = click.option(
        "--decode-on-device",
        is_flag=True,
        help="Decode JPEGs on the CUDA device (nvJPEG), Pillow for the rest and as fallback; "
        "for GPU nodes short of CPU cores.",
    )(func)
    func = click.option("--no-draft", is_flag=True, help="Decode large JPEGs at full size (slower).")(func)
    func = click.option(
        "--background", default="255,255,255", show_default=True, help="R,G,B composited under transparent pixels."
    )(func)
    func = click.option(
        "--max-pixels",
        type=click.IntRange(1),
        default=89_478_485,
        show_default=True,
        help="Refuse pictures larger than this (checked from the header).",
    )(func)
    func = click.option(
        "--shard",
        default=None,
        help="I/N: caption only shard I of N, chosen by a hash of the picture id (of the tar name for shards, "
        "of the row group for Parquet tables); "
        "default: SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT when set.",
    )(func)
    func = click.option(
        "--files-from",
        type=click.Path(allow_dash=True),
        default=None,
        help="Read input paths from FILE, one per line ('-' for stdin); a .parquet, .csv, .tsv, .jsonl or "
        ".ndjson FILE is a manifest: a table with a column of paths (see --path-column, --id-column).",
    )(func)
    func = click.option(
        "--path-column",
        default=None,
        help="A --files-from manifest: the column of picture paths "
        "[default: the first of path, filepath, file, url, image_path it has].",
    )(func)
    return func


def output_options(func: F) -> F:
    """Where the captions go and how progress is committed."""
    func = click.option(
        "--log-every",
        type=float,
        default=30.0,
        show_default=True,
        help="Seconds between progress lines when not on a terminal.",
    )(func)
    func = click.option(
        "--max-failures",
        default="0.5",
        show_default=True,
        help="Exit non-zero when failed inputs exceed this count (10) or fraction (0.05, 5%).",
    )(func)
    func = click.option(
        "--commit-seconds",
        type=click.FloatRange(min=0, min_open=True),
        default=60.0,
        show_default=True,
        help="Also commit once the oldest uncommitted row is this old (slow runs).",
    )(func)
    func = click.option(
        "--commit-every",
        type=click.IntRange(1),
        default=512,
        show_default=True,
        help="Rows per committed part; a kill loses at most this many.",
    )(func)
    func = click.option("--overwrite", is_flag=True, help="Start over instead of resuming.")(func)
    func = click.option(
        "--format",
        type=click.Choice(["parquet", "jsonl"]),
        default=None,
        help="Output format. Default: from the --out suffix.",
    )(func)
    func = click.option(
        "--out", "-o", required=True, type=click.Path(dir_okay=False), help="Output file (.parquet or .jsonl)."
    )(func)
    return func


def ray_options(func: F) -> F:
    """--ray and its task settings: run the shards as Ray tasks, then merge (batchcap.pipeline.ray_engine)."""
    func = click.option(
        "--ray-parts",
        type=click.Path(file_okay=False),
        default=None,
        help="With --ray: folder of the part files, on storage every worker mounts [default: OUT.parts].",
    )(func)
    func = click.option(
        "--ray-retries",
        type=click.IntRange(0),
        default=3,
        show_default=True,
        help="With --ray: how often Ray reruns a task that crashed or whose worker died; it resumes its part.",
    )(func)
    func = click.option(
        "--ray-gpus",
        type=click.FloatRange(0),
        default=None,
        help="With --ray: GPUs per task [default: 1 with --device cuda, 0 with cpu; auto: 1 if the cluster has GPUs].",
    )(func)
    func = click.option(
        "--ray-cpus",
        type=click.FloatRange(0, min_open=True),
        default=1.0,
        show_default=True,
        help="With --ray: CPUs per task; --workers auto becomes this minus one (at least 1).",
    )(func)
    func = click.option(
        "--tasks",
        type=click.IntRange(1),
        default=None,
        help="With --ray: how many shard tasks (part I captions --shard I/N).",
    )(func)
    func = click.option(
        "--ray",
        is_flag=False,
        flag_value="auto",
        default=None,
        metavar="[ADDRESS]",
        help="Run --tasks shard tasks on a Ray cluster, each into OUT.parts/part-I, then merge them into --out. "
        "ADDRESS: HOST:6379 or ray://HOST:10001; none or auto: what ray.init() finds. Needs batchcap[ray].",
    )(func)
    return func


# -- the group ---------------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="batchcap")
def cli() -> None:
    """Caption image collections: Xception features, LSTM beam search, resumable Parquet/JSONL.

    \b
    Start here:
        batchcap run ./photos --out captions.parquet
        batchcap report captions.parquet --html report.html
    """


@cli.command()
@click.argument("sources", nargs=-1)
@input_options
@click.option(
    "--id-from",
    type=click.Choice(["auto", "relative", "source-relative", "absolute"]),
    default="auto",
    show_default=True,
    help="How picture ids are made. relative: path within its folder, <shard name>/<key> in a tar; "
    "source-relative: prefixed with the source's path relative to the sources' common parent "
    "(cam2023/IMG_1.jpg); absolute: prefixed with its absolute path. auto: relative for one folder or "
    "tar source, or for pictures and lists only; source-relative otherwise. A resume setting.",
)
@output_options
@click.option(
    "--min-confidence",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Set aside captions whose confidence is below P: status low_confidence, caption kept "
    "for review; not counted as failures. Default: off.",
)
@model_options
@runtime_options
@backend_options
@beam_options
@ray_options
@user_errors
@interruptible
def run(sources: tuple[str, ...], **options: Any) -> None:
    """Caption every picture in SOURCES (folders, files, WebDataset shards, Parquet tables) into --out.

    Sources may be URLs (s3://, gs://, https://, ...); --out is a local or mounted path.

    Rerunning the same command resumes: only pictures not yet in the output are
    captioned, and pictures whose size or modification time changed are captioned
    again. A second run on the same output while one is active exits at once.
    SIGTERM or Ctrl-C commits what is captioned and exits 6: rerun to resume.

    \b
    Examples:
        batchcap run ./photos --out captions.parquet
        batchcap run 'shards/train-{0000..0099}.tar' --out captions.jsonl --beam 5 --n-best 3
        batchcap run ./photos --out part-0.parquet --shard 0/4
        batchcap run 'laion/*.parquet' --out captions.parquet --id-column key
        batchcap run s3://bucket/photos/ --out captions.parquet
        batchcap run --files-from manifest.csv --path-column file --id-column sku --out captions.parquet
        batchcap run /shared/photos --out /shared/captions.parquet --ray --tasks 16 --ray-cpus 4
    """
    ray_settings = {key: options.pop(key) for key in _RAY_OPTIONS}
    if ray_settings["ray"] is not None:
        _run_on_ray(sources, ray_settings, options)
    given = [f"--{key.replace('_', '-')}" for key, default in _RAY_OPTIONS.items() if ray_settings[key] != default]
    if given:
        raise click.UsageError(f"{', '.join(given)}: only with --ray [ADDRESS]")
    from batchcap.config import UsageError
    from batchcap.outputs.lock import LockHeld
    from batchcap.outputs.store import OutputIOError, ResumeRefused
    from batchcap.pipeline.api import run as run_captions
    from batchcap.pipeline.progress import EXIT_IO_ERROR, EXIT_LOCKED, EXIT_RESUME_REFUSED

    try:
        # every option is batchcap.run's keyword of the same name, so the two cannot drift apart
        result = run_captions(sources, **options)
    except UsageError as exc:
        raise click.UsageError(str(exc)) from exc
    except LockHeld as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_LOCKED)
    except ResumeRefused as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_RESUME_REFUSED)
    except OutputIOError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_IO_ERROR)
    sys.exit(result.exit_code)


#: The options of `run --ray` and their defaults (a changed one without --ray is refused).
_RAY_OPTIONS = {
    "ray": None,
    "tasks": None,
    "ray_cpus": 1.0,
    "ray_gpus": None,
    "ray_retries": 3,
    "ray_parts": None,
}


def _run_on_ray(sources: tuple[str, ...], ray_settings: dict[str, Any], options: dict[str, Any]) -> NoReturn:
    """`run --ray`: the shards as Ray tasks, then the merge; exits with the run's code."""
    from batchcap.config import UsageError
    from batchcap.outputs.lock import LockHeld
    from batchcap.pipeline.progress import EXIT_LOCKED
    from batchcap.pipeline.ray_engine import ShardError, run_on_ray

    if ray_settings["tasks"] is None:
        raise click.UsageError("--ray needs --tasks N: how many shard tasks to cut the work into")
    try:
        result = run_on_ray(sources, options.pop("out"), **ray_settings, **options)
    except UsageError as exc:
        raise click.UsageError(str(exc)) from exc
    except ShardError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except LockHeld as exc:  # --overwrite found a part being written
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_LOCKED)
    sys.exit(result.exit_code)


@cli.command()
@click.argument("data", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Model file to write.")
@click.option(
    "--format",
    "fmt",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "flickr8k", "kaggle", "karpathy", "coco", "wds"]),
    help="Dataset layout (auto-detected by default; with several DATA, detected for each).",
)
@click.option(
    "--images",
    type=click.Path(file_okay=False),
    default=None,
    help="Image folder, when it is not where the layout expects it (one DATA only).",
)
@click.option(
    "--dataset-weight",
    "dataset_weights",
    type=click.FloatRange(0, min_open=True),
    multiple=True,
    help="With several DATA: one per DATA, in order; each dataset's share of an epoch's draws "
    "(e.g. 3 and 1: three quarters Flickr8k, a quarter everyday photos). Default: every training "
    "image once per epoch.",
)
@click.option(
    "--select",
    type=click.Choice(["mean", "min", "first"]),
    default="mean",
    show_default=True,
    help="With several DATA: the best epoch is the one with the best mean, lowest or first DATA's val CIDEr-D.",
)
@click.option(
    "--dataset-styles",
    is_flag=True,
    help="With several DATA: learn one caption style per DATA (how its annotators describe), each "
    "caption trained in its own dataset's style; `run` picks a picture's style from its nearest "
    "training pictures once the model is calibrated (--style chooses one). With --init-model the "
    "styles start from the model's unstyled decoder.",
)
@click.option(
    "--encoder", "encoder_name", default="legacy_xception", show_default=True, help="timm model name of the encoder."
)
@click.option(
    "--encoder-weights",
    type=click.Path(dir_okay=False),
    envvar="BATCHCAP_ENCODER_WEIGHTS",
    default=None,
    show_envvar=True,
    help="Local encoder weights; without them timm downloads pretrained weights (online only).",
)
@click.option(
    "--input-size",
    type=click.IntRange(32),
    default=None,
    help="Encoder input side in pixels. Default: the encoder's own (299 for Xception).",
)
@click.option(
    "--resize",
    type=click.Choice(["squash", "crop"]),
    default="squash",
    show_default=True,
    help="squash: resize to a square ignoring aspect (as the Keras tutorials); crop: timm's resize + "
    "centre crop. Stored in the model file so captioning uses the same.",
)
@click.option("--pooled", is_flag=True, help="Pooled features only (no attention over the spatial map).")
@click.option(
    "--deep-output",
    is_flag=True,
    help="Predict words from embedding + LSTM state + attention context (SAT's deep output layer).",
)
@click.option("--epochs", type=click.IntRange(1), default=20, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="Images per step (each with all of its captions).",
)
@click.option(
    "--lr", type=float, default=None, help="Peak learning rate (AdamW). Default: 4e-4, or 1e-4 with --self-critical."
)
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--grad-clip", type=float, default=5.0, show_default=True, help="Max gradient norm.")
@click.option("--warmup-steps", type=click.IntRange(0), default=200, show_default=True)
@click.option("--dropout", type=click.FloatRange(0, 0.9), default=0.5, show_default=True)
@click.option("--embed-dim", type=click.IntRange(8), default=256, show_default=True)
@click.option("--hidden-dim", type=click.IntRange(8), default=512, show_default=True)
@click.option("--attention-dim", type=click.IntRange(8), default=512, show_default=True)
@click.option("--layers", type=click.IntRange(1, 4), default=1, show_default=True, help="Stacked LSTM layers.")
@click.option(
    "--min-word-count",
    type=click.IntRange(1),
    default=5,
    show_default=True,
    help="Words seen fewer times in training captions become <unk>.",
)
@click.option("--max-caption-len", type=click.IntRange(2), default=20, show_default=True)
@click.option("--label-smoothing", type=click.FloatRange(0, 0.5), default=0.0, show_default=True)
@click.option(
    "--attention-penalty",
    type=click.FloatRange(0),
    default=1.0,
    show_default=True,
    help="Weight of Show-Attend-Tell's doubly stochastic attention penalty.",
)
@click.option(
    "--val-beam",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Beam width used to score the validation split each epoch.",
)
@click.option("--val-images", type=click.IntRange(1), default=1000, show_default=True)
@click.option(
    "--patience",
    type=click.IntRange(1),
    default=4,
    show_default=True,
    help="Stop after this many epochs without a better validation CIDEr.",
)
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Feature cache folder. Default: .batchcap-features beside --out.",
)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint beside --out.")
@click.option("--augment", is_flag=True, help="Also train on horizontally flipped pictures (a second cached view).")
@click.option(
    "--finetune-encoder",
    is_flag=True,
    help="Fine-tune the encoder too, at --encoder-lr (no feature cache; the encoder is embedded in "
    "the model file). Practical on a GPU; very slow on a CPU.",
)
@click.option(
    "--finetune-exit-flow",
    is_flag=True,
    help="Fine-tune Xception's exit flow too, at --encoder-lr, on cached middle-flow activations "
    "(525 KB a picture): about 2 minutes more an epoch for Flickr8k on a 2-core CPU. The model "
    "file stores the exit flow's 6.8 M weights; the rest stays the --encoder-weights file.",
)
@click.option(
    "--encoder-lr",
    type=float,
    default=1e-5,
    show_default=True,
    help="Learning rate of the encoder with --finetune-encoder or --finetune-exit-flow.",
)
@click.option(
    "--init-model",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Start from this model file: its decoder weights, architecture, vocabulary and encoder "
    "settings (giving encoder or decoder-shape options as well is refused).",
)
@click.option(
    "--self-critical",
    is_flag=True,
    help="Fine-tune --init-model on the CIDEr-D of its own sampled captions (self-critical "
    "sequence training) instead of on the reference words.",
)
@click.option(
    "--samples-per-image",
    type=click.IntRange(2),
    default=5,
    show_default=True,
    help="Captions sampled per image in a --self-critical step.",
)
@click.option(
    "--pretrain-captions",
    type=click.Path(exists=True, dir_okay=False),
    multiple=True,
    help="Caption text without photos (IMAGE#N<TAB>caption lines, or one caption per line) to "
    "pretrain the fresh decoder on as a language model first, conditioned on a null image; "
    "repeat it for several files (e.g. Flickr30k and COCO captions), read as one text. "
    "Captions of the dataset's own photos and copies of its validation captions are dropped.",
)
@click.option(
    "--pretrain-epochs",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Epochs over --pretrain-captions (at --lr, --warmup-steps, 5 captions per --batch-size photo).",
)
@click.option(
    "--vocabulary-from-text",
    is_flag=True,
    help="Count the words of --pretrain-captions towards the vocabulary too (--min-word-count over "
    "the training captions and the text together): words the photos show rarely but the text knows "
    "well can then be written instead of <unk>.",
)
@click.option(
    "--vocabulary-from",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="With --init-model: write with this model file's vocabulary instead of the start model's. Words "
    "both know keep what the start model learnt; the others start fresh (train them with teacher "
    "forcing before --self-critical): a model grows the words of another data set.",
)
@click.option("--half", is_flag=True, help="Store the decoder weights as fp16 (half the file size).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help="Precision of the encoder when computing features.",
)
@click.option("--workers", default="auto", show_default=True, help="Image decoding processes.")
@user_errors
def train(
    data: tuple[str, ...],
    out: str,
    fmt: str,
    images: str | None,
    dataset_weights: tuple[float, ...],
    select: str,
    dataset_styles: bool,
    encoder_name: str,
    encoder_weights: str | None,
    input_size: int | None,
    resize: str,
    pooled: bool,
    deep_output: bool,
    epochs: int,
    batch_size: int,
    lr: float | None,
    weight_decay: float,
    grad_clip: float,
    warmup_steps: int,
    dropout: float,
    embed_dim: int,
    hidden_dim: int,
    attention_dim: int,
    layers: int,
    min_word_count: int,
    max_caption_len: int,
    label_smoothing: float,
    attention_penalty: float,
    val_beam: int,
    val_images: int,
    patience: int,
    seed: int,
    cache_dir: str | None,
    resume: bool,
    augment: bool,
    finetune_encoder: bool,
    finetune_exit_flow: bool,
    encoder_lr: float,
    init_model: str | None,
    self_critical: bool,
    samples_per_image: int,
    pretrain_captions: tuple[str, ...],
    pretrain_epochs: int,
    vocabulary_from_text: bool,
    vocabulary_from: str | None,
    half: bool,
    device: str,
    precision: str,
    workers: str,
) -> None:
    """Train a caption decoder on DATA and write one self-describing model file.

    DATA is a Flickr8k folder (Flickr8k.token.txt + split files + photos), a Kaggle
    captions.txt folder, a Karpathy split JSON, COCO caption JSON + images, or
    WebDataset shards with jpg + txt/json. Encoder features are cached and reused.
    Several DATA train one model on all of them: the vocabulary comes from all their
    training captions, --dataset-weight sets each one's share of an epoch, and each
    one's val split is scored every epoch (--select combines them).

    \b
    Examples:
        batchcap train flickr8k/ --out flickr8k.safetensors \\
            --encoder-weights legacy_xception.safetensors
        batchcap train flickr8k/ --out flickr8k-scst.safetensors \\
            --init-model flickr8k.safetensors --self-critical --epochs 10
        batchcap train flickr8k/ everyday/dataset_everyday.json --out both.safetensors \\
            --init-model flickr8k.safetensors --dataset-weight 3 --dataset-weight 1
    """
    from batchcap.config import EncoderConfig, TrainConfig
    from batchcap.data.captions.factory import load_caption_dataset
    from batchcap.data.captions.mixture import mix_datasets
    from batchcap.pipeline.settings import runtime_config
    from batchcap.training.driver import train as train_decoder
    from batchcap.training.feature_sources import describe_encoder
    from batchcap.training.metrics import require_metrics

    require_metrics()  # every epoch is scored on the validation split
    _one_data_options(data, fmt, images)
    if dataset_weights and len(dataset_weights) != len(data):
        raise click.UsageError(
            f"{len(dataset_weights)} --dataset-weight for {len(data)} DATA: give one per DATA, in the "
            "order of DATA (or none: every training image once per epoch)"
        )
    if dataset_styles and len(data) < 2:
        raise click.UsageError("--dataset-styles learns one caption style per DATA: give two or more DATA")
    if init_model and pretrain_captions:
        raise click.UsageError(
            "--pretrain-captions pretrains a fresh decoder and --init-model starts from a "
            "trained one: give one of them (pretrain in the first stage of a recipe)"
        )
    if vocabulary_from_text and not pretrain_captions:
        raise click.UsageError("--vocabulary-from-text counts the words of --pretrain-captions: give that text too")
    if vocabulary_from and not init_model:
        raise click.UsageError(
            "--vocabulary-from changes the vocabulary of an --init-model; a fresh model builds its own "
            "(--min-word-count, --vocabulary-from-text)"
        )
    runtime = runtime_config(device, precision, batch_size, workers)
    if init_model:  # the encoder, preprocessing, decoder shape and vocabulary are the start model's
        from batchcap.encode.weights import resolve_encoder_weights
        from batchcap.model.modelfile import load_model

        ctx = click.get_current_context()
        fixed = [
            f"--{name.replace('_', '-')}"
            for name in _MODEL_SHAPE_OPTIONS
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        ]
        if fixed:
            raise click.UsageError(
                f"{', '.join(fixed)}: with --init-model the encoder, preprocessing, decoder "
                "shape and vocabulary come from the model file; leave these options out"
            )
        start = load_model(init_model)
        encoder_name, pooled, preprocess = start.encoder.name, not start.encoder.spatial, start.preprocess
        if start.encoder_state is None or start.encoder.finetuned:  # the weights file the model names
            source = resolve_encoder_weights(start, encoder_weights)
            encoder_weights = source.path if source.kind == "file" else None
    else:
        preprocess = _encoder_preprocess(encoder_name, resize, input_size)
    if lr is None:
        lr = 1e-4 if self_critical else 4e-4
    cfg = TrainConfig(
        data=data[0],
        datasets=data if len(data) > 1 else (),
        dataset_weights=dataset_weights if len(data) > 1 else (),
        select=select,
        dataset_styles=dataset_styles,
        out=out,
        format=fmt,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        warmup_steps=warmup_steps,
        min_word_count=min_word_count,
        max_caption_len=max_caption_len,
        seed=seed,
        cache_dir=cache_dir,
        resume=resume,
        augment=augment,
        finetune_encoder=finetune_encoder,
        finetune_exit_flow=finetune_exit_flow,
        encoder_lr=encoder_lr,
        val_beam_size=val_beam,
        val_images=val_images,
        patience=patience,
        init_model=init_model,
        self_critical=self_critical,
        samples_per_image=samples_per_image,
        pretrain_captions=pretrain_captions,
        pretrain_epochs=pretrain_epochs,
        vocabulary_from_text=vocabulary_from_text,
        vocabulary_from=vocabulary_from,
        extra={"label_smoothing": label_smoothing, "attention_penalty": attention_penalty, "half": half},
    )
    mix = mix_datasets([load_caption_dataset(d, fmt, images=images) for d in data], cfg.dataset_weights)
    for note in mix.merged.notes:
        click.echo(f"note: {note}", err=True)
    choice = describe_encoder(EncoderConfig(name=encoder_name, weights=encoder_weights, spatial=not pooled), preprocess)
    decoder_cfg = {
        "embed_dim": embed_dim,
        "hidden_dim": hidden_dim,
        "num_layers": layers,
        "dropout": dropout,
        "attention": not pooled,
        "attention_dim": attention_dim,
        "deep_output": deep_output,
    }
    model = train_decoder(cfg, mix, choice, decoder_cfg, runtime, log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps({"model": out, "metrics": model.metrics}, indent=2))


def _one_data_options(data: tuple[str, ...], fmt: str, images: str | None) -> None:
    """--format and --images describe one dataset: refused with several DATA."""
    if len(data) > 1 and (images or fmt != "auto"):
        raise click.UsageError(
            "--images and --format apply to one DATA; with several DATA each layout is detected "
            "and its photos found where the layout keeps them"
        )


# train options that --init-model takes from the model file instead.
_MODEL_SHAPE_OPTIONS = (
    "encoder_name",
    "input_size",
    "resize",
    "pooled",
    "deep_output",
    "embed_dim",
    "hidden_dim",
    "attention_dim",
    "layers",
    "dropout",
    "min_word_count",
    "vocabulary_from_text",
)


def _encoder_preprocess(encoder_name: str, resize: str, input_size: int | None) -> Any:
    """The encoder's preprocessing from timm, with the chosen resize mode (and input size)."""
    import timm
    from timm.data import resolve_model_data_config

    from batchcap.data.preprocess import from_timm

    try:
        network = timm.create_model(encoder_name, pretrained=False, num_classes=0)
    except RuntimeError as exc:
        raise click.BadParameter(str(exc), param_hint="--encoder") from exc
    pre = from_timm(resolve_model_data_config(network), resize=resize)
    if input_size:
        from dataclasses import replace

        pre = replace(pre, input_size=(3, input_size, input_size))
    return pre


@cli.command(name="eval")
@click.argument("data", nargs=-1, required=True)
@click.option("--split", default="val", show_default=True, help="train, val (Flickr8k dev) or test.")
@click.option(
    "--format",
    "fmt",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "flickr8k", "kaggle", "karpathy", "coco", "wds"]),
)
@click.option("--images", type=click.Path(file_okay=False), default=None, help="Image folder override.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Score only the first N images.")
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write scores and per-image captions to this JSON file.",
)
@model_options
@runtime_options
@backend_options
@beam_options
@user_errors
def evaluate(
    data: tuple[str, ...],
    split: str,
    fmt: str,
    images: str | None,
    limit: int | None,
    json_out: str | None,
    model: str | None,
    encoder_weights: str | None,
    device: str,
    precision: str,
    batch_size: int | None,
    workers: str,
    backend: str,
    encoder_cache: str | None,
    beam: int,
    max_len: int | None,
    min_len: int,
    length_penalty: float,
    no_repeat_ngram: int,
    n_best: int,
    no_ending_rule: bool,
    allow_repeated_words: bool,
    style: str,
    consensus_weight: float | None,
) -> None:
    """Caption a split of DATA the way `run` does and score it with the COCO caption metrics.

    BLEU-1..4, METEOR (needs Java), ROUGE-L and CIDEr-D from pycocoevalcap, with the
    COCO toolkit's PTB tokenizer when Java is available. Several DATA are scored one by
    one (--limit applies to each); --json then holds one result per dataset.

    \b
    Examples:
        batchcap eval flickr8k/ --split val --beam 3 --json dev-scores.json
        batchcap eval flickr8k/ everyday/dataset_everyday.json --split val
    """
    from batchcap.data.captions.factory import load_caption_dataset
    from batchcap.data.captions.mixture import dataset_names
    from batchcap.model.modelfile import load_model, resolve_model_path
    from batchcap.pipeline.settings import beam_config, runtime_config
    from batchcap.training.evaluate import evaluate_split, format_scores
    from batchcap.training.metrics import require_metrics

    require_metrics()
    _one_data_options(data, fmt, images)
    model_obj = load_model(resolve_model_path(model))
    beam_cfg = beam_config(
        beam,
        max_len,
        min_len,
        length_penalty,
        no_repeat_ngram,
        n_best,
        model_obj.max_caption_len,
        no_ending_rule=no_ending_rule,
        allow_repeated_words=allow_repeated_words,
        style=style,
        consensus_weight=consensus_weight,
        has_neighbours=model_obj.neighbours is not None,
    )
    runtime = runtime_config(device, precision, batch_size, workers, backend, encoder_cache)
    datasets = [load_caption_dataset(d, fmt, images=images) for d in data]
    for path, dataset in zip(data, datasets):  # every DATA is checked before the first is captioned
        if split not in dataset.splits or not dataset.splits[split]:
            raise click.ClickException(
                f"{path} has no images in split {split!r} "
                f"(it has: {', '.join(s for s, r in dataset.splits.items() if r)})"
            )
    results = {}
    for name, dataset in zip(dataset_names(datasets), datasets):
        results[name] = evaluate_split(
            dataset,
            split,
            model_obj,
            runtime,
            beam_cfg,
            encoder_weights=encoder_weights,
            limit=limit,
            log=lambda m: click.echo(m, err=True),
        )
        click.echo((f"{name}: " if len(datasets) > 1 else "") + format_scores(results[name]))
    if json_out:
        written = next(iter(results.values())) if len(results) == 1 else {"datasets": results}
        Path(json_out).write_text(json.dumps(written, indent=2) + "\n")
        click.echo(f"wrote {json_out}", err=True)


@cli.command()
@click.argument("data", nargs=-1, required=True)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(dir_okay=False),
    help="Model file to write: the input model plus word rules, familiarity and calibrator.",
)
@click.option(
    "--format",
    "fmt",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "flickr8k", "kaggle", "karpathy", "coco", "wds"]),
)
@click.option("--images", type=click.Path(file_okay=False), default=None, help="Image folder override.")
@click.option(
    "--unfamiliar",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="A folder of pictures unlike the training data, to check that they get low confidence.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where encoder features are cached [default: .batchcap-features beside --out].",
)
@click.option(
    "--train-images",
    type=click.IntRange(3),
    default=None,
    help="Train pictures (every k-th id in sorted order) for the familiarity statistics and the "
    "neighbours a caption is compared with. Default: all of them (closer neighbours, a better "
    "confidence; the model file keeps about 0.8 KB a picture).",
)
@click.option(
    "--neighbours",
    "neighbours_k",
    type=click.IntRange(1),
    default=NEIGHBOURS_K,
    show_default=True,
    help="Nearest training pictures whose captions a caption's consensus is measured against.",
)
@click.option(
    "--components",
    type=click.IntRange(1),
    default=128,
    show_default=True,
    help="Principal components of the familiarity fit.",
)
@click.option("--refit-familiarity", is_flag=True, help="Refit familiarity even when the model has it.")
@click.option(
    "--word-rules-only",
    is_flag=True,
    help="Only add the word rules the model lacks (ending rule, repeat rule), learnt from DATA's train "
    "captions; nothing is encoded, and familiarity and calibrator stay as they are.",
)
@click.option(
    "--folds",
    type=click.IntRange(2),
    default=5,
    show_default=True,
    help="Cross-validation folds for the reported AUROC and reliability table.",
)
@click.option(
    "--label-threshold",
    type=float,
    default=0.5,
    show_default=True,
    help="A dev caption counts as acceptable when its CIDEr-D reaches this.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the calibration report to this JSON file.",
)
@model_options
@runtime_options
@beam_options
@user_errors
def calibrate(
    data: tuple[str, ...],
    out: str,
    fmt: str,
    images: str | None,
    unfamiliar: str | None,
    cache_dir: str | None,
    train_images: int | None,
    neighbours_k: int,
    components: int,
    refit_familiarity: bool,
    word_rules_only: bool,
    folds: int,
    label_threshold: float,
    json_out: str | None,
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
    no_ending_rule: bool,
    allow_repeated_words: bool,
    style: str,
    consensus_weight: float | None,
) -> None:
    """Fit the confidence of a model's captions on DATA's dev split and write the model to --out.

    Adds what a caption's `confidence` needs: the word rules (the ending and repeat rules,
    learnt from the train captions when the model lacks them), familiarity statistics of
    train pictures' encoder features, and a logistic calibrator fitted on dev pictures
    against per-image CIDEr-D. Prints the cross-validated AUROC and a reliability table; the
    decoder is unchanged. With --word-rules-only, only the word rules are added.
    Several DATA calibrate on the union of their dev splits, with familiarity from all
    their train pictures, and report each dev set and the pool.

    \b
    Examples:
        batchcap calibrate flickr8k/ --unfamiliar ./everyday-photos \\
            --out calibrated.safetensors
        batchcap calibrate flickr8k/ --model old.safetensors --word-rules-only --out ruled.safetensors
        batchcap calibrate flickr8k/ everyday/dataset_everyday.json \\
            --model both.safetensors --out both-calibrated.safetensors
    """
    from batchcap.data.captions.factory import load_caption_dataset
    from batchcap.data.captions.mixture import mix_datasets
    from batchcap.model.modelfile import load_model, resolve_model_path, save_model
    from batchcap.pipeline.settings import beam_config, runtime_config
    from batchcap.training.calibrate import add_missing_word_rules, format_report
    from batchcap.training.calibrate import calibrate as fit

    _one_data_options(data, fmt, images)
    model_obj = load_model(resolve_model_path(model))
    mix = mix_datasets([load_caption_dataset(d, fmt, images=images) for d in data])
    if word_rules_only:
        dataset = mix.merged
        if not dataset.splits.get("train"):
            raise click.UsageError(
                f"{' '.join(data)}: no train split to learn the word rules from; give a captioned dataset"
            )
        add_missing_word_rules(model_obj, dataset.splits["train"], str(dataset.root), lambda m: click.echo(m, err=True))
        save_model(model_obj, out)
        click.echo(f"wrote {out} ({model_obj.identity})", err=True)
        return
    beam_cfg = beam_config(
        beam,
        max_len,
        min_len,
        length_penalty,
        no_repeat_ngram,
        n_best,
        model_obj.max_caption_len,
        no_ending_rule=no_ending_rule,
        allow_repeated_words=allow_repeated_words,
        style=style,
        consensus_weight=consensus_weight,
        has_neighbours=True,  # calibrate fits the neighbour statistics before it captions dev
    )
    runtime = runtime_config(device, precision, batch_size, workers)
    try:
        report = fit(
            model_obj,
            mix,
            runtime,
            beam_cfg,
            cache_dir=cache_dir or str(Path(out).parent / ".batchcap-features"),
            unfamiliar=unfamiliar,
            train_images=train_images,
            neighbours_k=neighbours_k,
            components=components,
            folds=folds,
            label_threshold=label_threshold,
            refit_familiarity=refit_familiarity,
            encoder_weights=encoder_weights,
            log=lambda m: click.echo(m, err=True),
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    save_model(model_obj, out)
    click.echo(format_report(report))
    click.echo(f"wrote {out} ({model_obj.identity})", err=True)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_out}", err=True)


@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Model file to write.")
@click.option(
    "--weights",
    default=None,
    metavar="W1,W2,..",
    help="Mixing weights, one per model, normalised to sum to 1. Default: equal.",
)
@click.option("--half", is_flag=True, help="Store the decoder weights as fp16 (half the file size).")
@user_errors
def average(models: tuple[str, ...], out: str, weights: str | None, half: bool) -> None:
    """Average the decoder weights of MODELS into one model file (a "model soup").

    For decoders fine-tuned from one another (e.g. a model and its --self-critical
    fine-tune): the mean captions about as well as an ensemble at the cost of one model.
    Fine-tuned exit flows (--finetune-exit-flow) are averaged with the same weights.
    Models with another vocabulary, architecture or encoder are refused. Score the result
    with `batchcap eval` (and refit its confidence with `batchcap calibrate`) before using it.

    \b
    Example:
        batchcap average flickr8k.safetensors flickr8k-scst.safetensors --weights 0.25,0.75 \\
            --out flickr8k-soup.safetensors
    """
    from batchcap.model.modelfile import load_model, save_model
    from batchcap.tools.average import average_models

    try:
        mix = None if weights is None else [float(w) for w in weights.split(",")]
    except ValueError as exc:
        raise click.BadParameter(f"{weights!r}: expected numbers separated by commas", param_hint="--weights") from exc
    loaded = [load_model(path) for path in models]
    averaged = save_model(average_models(loaded, mix, name=Path(out).stem), out, half=half)
    click.echo(
        json.dumps(
            {
                "model": out,
                "identity": averaged.identity,
                "members": [
                    {"model": path, "weight": m["weight"]} for path, m in zip(models, averaged.training["averaged"])
                ],
            },
            indent=2,
        )
    )


@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Model file to write.")
@click.option(
    "--combine",
    type=click.Choice(["logprob", "prob"]),
    default="logprob",
    show_default=True,
    help="logprob: mean of the members' log-probabilities, renormalised; prob: mean of their probabilities.",
)
@click.option("--half", is_flag=True, help="Store the decoder weights as fp16 (half the file size).")
@user_errors
def ensemble(models: tuple[str, ...], out: str, combine: str, half: bool) -> None:
    """Put the decoders of MODELS into one model file, searched as one ensemble.

    At every word of the beam search each decoder scores the same hypotheses and their
    log-probabilities are combined: better captions for one decoder step per member. Unlike
    `average`, members may come from different random starts (train with other --seed). They
    must share vocabulary, encoder and preprocessing. The ensemble has no confidence
    calibration or scores yet: run `batchcap calibrate` and `batchcap eval` on it.

    \b
    Example:
        batchcap ensemble seed1.safetensors seed2.safetensors seed3.safetensors \\
            --out flickr8k-ensemble.safetensors --half
    """
    from batchcap.model.modelfile import load_model, save_model
    from batchcap.tools.ensemble import ensemble_models

    loaded = [load_model(path) for path in models]
    combined = save_model(ensemble_models(loaded, combine, name=Path(out).stem), out, half=half)
    click.echo(
        json.dumps(
            {
                "model": out,
                "identity": combined.identity,
                "combine": combine,
                "members": [m.identity for m in combined.decoders()],
            },
            indent=2,
        )
    )


@cli.command()
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the full metadata as JSON.")
@click.option("--vocab", "show_vocab", is_flag=True, help="Also list the vocabulary.")
@user_errors
def info(model: str | None, as_json: bool, show_vocab: bool) -> None:
    """Show what a model file holds: encoder, preprocessing, decoder, vocabulary, training, scores and terms of use.

    The terms of use (`licence` in --json) follow from the training data the file records:
    a model learnt from research-use data (the packaged one: Flickr8k, Flickr30k captions)
    may be used for research only, whatever the licence of batchcap's code (MIT).
    Without MODEL, describes the model shipped with batchcap.

    \b
    Examples:
        batchcap info
        batchcap info flickr8k.safetensors --json
    """
    from batchcap.model.modelfile import load_model, resolve_model_path
    from batchcap.tools.info import describe_model, terms_of

    loaded = load_model(resolve_model_path(model))
    meta = loaded.metadata()
    if "neighbours" in meta:  # 7,500 reference captions: a count says enough
        meta["neighbours"] = {"k": meta["neighbours"]["k"], "pictures": len(meta["neighbours"]["captions"])}
    meta["licence"] = terms_of(loaded)  # derived from the training records, not stored in the file
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
    describe_model(loaded, show_vocab=show_vocab)


@cli.command()
@click.argument("parts", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Merged output file.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["parquet", "jsonl"]),
    default=None,
    help="Output format. Default: from the --out suffix.",
)
@click.option(
    "--expect-parts",
    type=click.IntRange(1),
    default=None,
    help="Refuse unless parts part-0..part-(N-1) are all present.",
)
@click.option(
    "--expect-count",
    type=click.IntRange(0),
    default=None,
    help="Refuse unless the merged output has exactly this many rows.",
)
@click.option(
    "--expect-listing",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Refuse unless the ids are exactly those in this file (one per line).",
)
@user_errors
def merge(
    parts: tuple[str, ...],
    out: str,
    fmt: str | None,
    expect_parts: int | None,
    expect_count: int | None,
    expect_listing: str | None,
) -> None:
    """Combine part outputs (e.g. from a Slurm array) into one file, after verifying them.

    Refuses, writing nothing, when a part is missing or unreadable, an id appears
    twice, parts come from different models or settings, or counts do not match.

    \b
    Example:
        batchcap merge out/part-*.parquet --expect-parts 8 --out captions.parquet
    """
    from batchcap.outputs.merge import merge_outputs, read_listing

    expected_ids = read_listing(expect_listing) if expect_listing else None
    report = merge_outputs(
        list(parts), out, fmt=fmt, expected_ids=expected_ids, expected_count=expect_count, expected_parts=expect_parts
    )
    click.echo(report.summary())


@cli.command()
@click.argument("output", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the page [default: OUTPUT + .html, e.g. captions.parquet.html, so "
    "reports of captions.parquet and captions.jsonl never replace each other].",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="Show the first N cards after ordering (0: all). Failures are always listed.",
)
@click.option("--sample", type=click.IntRange(min=1), default=None, help="Show a random sample of N rows instead.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --sample.")
@click.option(
    "--order",
    type=click.Choice(["confidence", "score", "id"]),
    default=None,
    help="confidence: lowest confidence first (captions without one follow, lowest score first); "
    "score: lowest search score first; id. [default: confidence; an output without confidence "
    "values is shown lowest score first, and the page says so]",
)
@click.option(
    "--status",
    "only_status",
    default=None,
    help="Show only rows of this status, e.g. low_confidence (the rows --min-confidence set aside).",
)
@click.option("--link-images", is_flag=True, help="Link the original files instead of embedding thumbnails.")
@click.option("--thumb-size", type=click.IntRange(32, 1024), default=192, show_default=True)
@click.option(
    "--skip-bad-lines",
    is_flag=True,
    help="JSONL: report the readable rows of a damaged file (bad lines are listed) instead of refusing.",
)
@user_errors
def report(
    output: str,
    html_path: str | None,
    limit: int,
    sample: int | None,
    seed: int,
    order: str | None,
    only_status: str | None,
    link_images: bool,
    thumb_size: int,
    skip_bad_lines: bool,
) -> None:
    """Write a self-contained HTML page of a run's OUTPUT: thumbnails, captions, failures.

    Lowest-confidence captions come first (lowest score first for an output without
    confidence values); the page filters by status and searches captions, and needs no
    server or network. Works on Parquet and JSONL outputs that batchcap wrote; a file with
    neither batchcap's metadata nor its columns is refused.

    \b
    Example:
        batchcap report captions.parquet --html report.html
    """
    from batchcap.outputs.report import default_html_path, describe_lines, write_report

    html_path = html_path or default_html_path(output)
    s = write_report(
        output,
        html_path,
        limit=limit,
        sample=sample,
        seed=seed,
        link_images=link_images,
        thumb_size=thumb_size,
        order=order,
        status=only_status,
        skip_bad_lines=skip_bad_lines,
    )
    click.echo(
        f"wrote {s.html}: {s.shown:,} of {s.total_rows:,} rows, {s.thumbnails:,} thumbnails, "
        f"{s.html_bytes / 1e6:.1f} MB in {s.seconds:.1f} s"
    )
    if s.bad_lines:
        click.echo(
            f"warning: {output} is damaged: {s.bad_lines:,} line(s) are not rows and were left out "
            f"(line {describe_lines(s.bad_line_numbers)})",
            err=True,
        )


@cli.command()
@click.argument("images", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.option(
    "--count",
    type=click.IntRange(8),
    default=128,
    show_default=True,
    help="Pictures to use: generated ones when IMAGES is not given, else the first COUNT of IMAGES.",
)
@click.option("--size", default="224x224", show_default=True, help="WxH of generated JPEGs.")
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Timed repetitions per measurement (the median is reported).",
)
@model_options
@runtime_options
@backend_options
@beam_options
@user_errors
def bench(
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
    backend: str,
    encoder_cache: str | None,
    beam: int,
    max_len: int | None,
    min_len: int,
    length_penalty: float,
    no_repeat_ngram: int,
    n_best: int,
    no_ending_rule: bool,
    allow_repeated_words: bool,
    style: str,
    consensus_weight: float | None,
) -> None:
    """Measure this machine: encoder images/s per precision, decode rate, beam search, end-to-end run.

    \b
    Examples:
        batchcap bench
        batchcap bench ./photos --batch-size 64 --json
    """
    from batchcap.tools.bench import run_bench

    run_bench(
        images=images,
        as_json=as_json,
        count=count,
        size=size,
        repeats=repeats,
        model=model,
        encoder_weights=encoder_weights,
        device=device,
        precision=precision,
        batch_size=batch_size,
        workers=workers,
        backend=backend,
        encoder_cache=encoder_cache,
        beam=beam,
        max_len=max_len,
        min_len=min_len,
        length_penalty=length_penalty,
        no_repeat_ngram=no_repeat_ngram,
        n_best=n_best,
        no_ending_rule=no_ending_rule,
        allow_repeated_words=allow_repeated_words,
        style=style,
        consensus_weight=consensus_weight,
    )


def main() -> None:
    """Console-script entry point."""
    try:
        cli(prog_name="batchcap")
    finally:
        # The command is over and its exit status decided. A signal that arrives while the
        # interpreter shuts down (Slurm's time-limit warning, forwarded as SIGTERM just as a task
        # finished) must not turn a finished run's status into a kill, which fails the task.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
