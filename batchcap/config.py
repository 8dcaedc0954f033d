"""Frozen configuration objects, built once in the CLI layer and passed explicitly.

Nothing in batchcap reads a module-level device, path or setting: every stage takes
the dataclass that describes it. Each dataclass round-trips through ``to_dict`` /
``from_dict`` so that it can be written beside outputs and into model files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

# Nearest training pictures whose captions a caption's consensus reads (``batchcap calibrate
# --neighbours``); a model file stores the number it was calibrated with.
NEIGHBOURS_K = 10
# How much a hypothesis' consensus with its neighbours' captions counts against its mean token
# log-probability when the search's hypotheses are reranked (``--consensus-weight``). 1.0 scored best
# of 0.5, 1, 2 and 4 on both dev sets (docs/experiments.md); a model without neighbours is not reranked.
DEFAULT_CONSENSUS_WEIGHT = 1.0


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(obj)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild ``cls`` from ``data``, ignoring unknown keys and restoring tuples."""
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            continue
        if isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


@dataclass(frozen=True)
class Preprocess:
    """How pixels become the encoder's input tensor; stored in every model file.

    ``resize`` is ``"squash"`` (resize to ``input_size`` ignoring the aspect ratio, as the
    Keras tutorials and the shipped Flickr8k photos do) or ``"crop"`` (timm's: resize the
    shorter side to ``size / crop_pct``, then centre-crop).
    """

    input_size: tuple[int, int, int] = (3, 299, 299)
    resize: str = "squash"
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.resize not in ("squash", "crop"):
            raise ValueError(f"resize must be 'squash' or 'crop', not {self.resize!r}")
        if len(self.input_size) != 3 or self.input_size[0] != 3:
            raise ValueError(f"input_size must be (3, H, W), not {self.input_size!r}")

    @property
    def height(self) -> int:
        return int(self.input_size[1])

    @property
    def width(self) -> int:
        return int(self.input_size[2])


@dataclass(frozen=True)
class EncoderConfig:
    """Which timm network extracts features, and where its weights come from.

    ``weights`` is a local file (safetensors or a ``weights_only`` torch state dict);
    ``None`` with ``pretrained=True`` means timm's download (online users only).
    """

    name: str = "legacy_xception"
    weights: str | None = None
    pretrained: bool = False
    spatial: bool = True


@dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters that rebuild the LSTM caption decoder."""

    vocab_size: int
    feature_dim: int = 2048
    embed_dim: int = 256
    hidden_dim: int = 512
    num_layers: int = 1
    dropout: float = 0.5
    attention: bool = True
    attention_dim: int = 512
    deep_output: bool = False  # SAT's output layer: words from embedding + h + context, not h alone
    # Caption styles, one per training dataset (``train --dataset-styles``): a learnt offset of the
    # initial state lets one decoder write each dataset's way of describing; empty: no styles.
    styles: tuple[str, ...] = ()


@dataclass(frozen=True)
class BeamConfig:
    """Caption search settings shared by ``run``, ``eval`` and ``bench``.

    A hypothesis' score is ``sum(log p) / length ** length_penalty``; ``beam_size=1``
    is greedy decoding. ``ending_rule`` applies the model's ending rule (no caption ends on
    "a", nor on "a black"); ``allow_repeated_words`` lets any word follow itself, not only
    the model's learnt exceptions. ``style`` picks a decoder's caption style (``DecoderConfig.styles``).

    ``consensus_weight`` > 0 reranks the search's finished hypotheses by
    ``mean token log-probability + consensus_weight * consensus``, the consensus being the CIDEr-D
    of a hypothesis against what people wrote for the picture's nearest training pictures
    (consensus reranking; needs a model with neighbour statistics). 0 keeps the search's order.
    """

    beam_size: int = 5
    max_len: int = 20
    min_len: int = 1
    length_penalty: float = 0.0
    no_repeat_ngram: int = 0
    n_best: int = 1
    ending_rule: bool = True
    allow_repeated_words: bool = False
    # A decoder with caption styles: "auto" (each picture the style of most of its nearest training
    # pictures) or a style's name; a decoder without styles only takes "auto".
    style: str = "auto"
    consensus_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError("beam size must be at least 1")
        if self.max_len < 1 or self.min_len < 0 or self.min_len > self.max_len:
            raise ValueError(f"need 0 <= min_len <= max_len and max_len >= 1 (got {self.min_len}, {self.max_len})")
        if not 1 <= self.n_best <= self.beam_size:
            raise ValueError(f"n_best must be between 1 and the beam size ({self.beam_size})")
        if self.no_repeat_ngram < 0:
            raise ValueError("no_repeat_ngram must be >= 0")
        if not self.consensus_weight >= 0:  # also refuses NaN
            raise ValueError("consensus_weight must be >= 0")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how tensors are computed: resolved backend, device and precision, batching.

    ``backend`` is ``torch`` or ``openvino`` (the encoder's engine); ``backend_note`` says
    why it was chosen (e.g. that ``auto`` fell back to torch). ``encoder_cache`` is where
    converted encoders are kept (None: the user cache directory).
    """

    device: str = "cpu"
    precision: str = "fp32"  # resolved: fp32 | bf16 | fp16 (torch) | int8 (openvino)
    batch_size: int = 32
    workers: int = 2
    channels_last: bool = True
    backend: str = "torch"
    backend_note: str = ""
    encoder_cache: str | None = None


@dataclass(frozen=True)
class ImagePolicy:
    """What the input stage does to every file before it becomes pixels or a status."""

    max_pixels: int = 89_478_485  # Pillow's own bomb threshold
    background: tuple[int, int, int] = (255, 255, 255)
    draft: bool = True
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    decode_on_device: bool = False  # hand complete RGB/grey JPEGs to the model's device undecoded


@dataclass(frozen=True)
class RunConfig:
    """Everything ``batchcap run`` was asked to do, written beside its output."""

    sources: tuple[str, ...]
    out: str
    format: str = "parquet"
    files_from: str | None = None
    shard_index: int = 0
    shard_count: int = 1
    overwrite: bool = False
    incremental: bool = True
    max_failures: str = "0.5"
    commit_every: int = 512
    log_every: float = 30.0
    commit_seconds: float = 60.0
    min_confidence: float | None = None  # rows below get status low_confidence (None: off)
    id_column: str | None = None  # Parquet sources: the column of ids (None: key, else id, else file/row)
    id_from: str = "auto"  # how ids are made: auto | relative | source-relative | absolute
    path_column: str | None = None  # a --files-from manifest's column of paths (None: path, filepath, ...)


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``batchcap train`` needs; stored in the model file's training record."""

    data: str
    out: str
    format: str = "auto"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 4e-4
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    warmup_steps: int = 200
    min_word_count: int = 5
    max_caption_len: int = 20
    seed: int = 1234
    cache_dir: str | None = None
    resume: bool = False
    augment: bool = False
    finetune_encoder: bool = False
    finetune_exit_flow: bool = False  # train Xception's exit flow on cached trunk activations
    encoder_lr: float = 1e-5
    val_beam_size: int = 3
    val_images: int = 1000
    patience: int = 4
    init_model: str | None = None  # start from this model file's decoder and vocabulary
    self_critical: bool = False  # optimise CIDEr-D of sampled captions (needs init_model)
    samples_per_image: int = 5  # captions sampled per image in a self-critical step
    pretrain_captions: tuple[str, ...] = ()  # caption text files (no photos) to pretrain a fresh decoder on
    pretrain_epochs: int = 1  # epochs over pretrain_captions
    vocabulary_from_text: bool = False  # pretrain_captions' words count towards the vocabulary too
    vocabulary_from: str | None = None  # with init_model: that model's words, in this model file's vocabulary
    datasets: tuple[str, ...] = ()  # every DATA trained on, in order, when there are several (data is the first)
    dataset_weights: tuple[float, ...] = ()  # each dataset's share of an epoch's draws (empty: each image once)
    select: str = "mean"  # how several datasets' val CIDEr-D pick the best epoch: mean, min or first
    dataset_styles: bool = False  # one caption style per dataset (DecoderConfig.styles)
    extra: dict[str, Any] = field(default_factory=dict)


# Where a stored setting came from on the command line: how refusals name what differs.
_OPTION_OF_SETTING = {
    "model": "--model",
    "format": "--format",
    "beam_size": "--beam",
    "max_len": "--max-len",
    "min_len": "--min-len",
    "length_penalty": "--length-penalty",
    "no_repeat_ngram": "--no-repeat-ngram",
    "n_best": "--n-best",
    "ending_rule": "the ending rule (--no-ending-rule turns it off)",
    "allow_repeated_words": "--allow-repeated-words",
    "style": "--style",
    "consensus_weight": "--consensus-weight",
    "min_confidence": "--min-confidence",
    "id_from": "--id-from",
    "id_column": "--id-column",
}


def option_name(setting: str) -> str:
    """``"beam.beam_size"`` -> ``"--beam"``; a setting with no option of its own keeps a readable name.

    ``preprocess.*`` comes from the model file, so it reads ``the model's preprocessing (resize)``.
    """
    key = setting.removeprefix("resume_settings.")
    if key.startswith("preprocess."):
        return f"the model's preprocessing ({key.split('.', 1)[1].replace('_', ' ')})"
    leaf = key.removeprefix("beam.")
    return _OPTION_OF_SETTING.get(leaf, key.replace("_", " "))


class OptionError(ValueError):
    """A command-line value that cannot be used; ``option`` is the flag as typed (``--beam``)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


class UsageError(ValueError):
    """Values that cannot be used together, or none where one is needed; the message says what to do.

    Unlike :class:`OptionError` it names no single option: the command line shows it as a usage error.
    """
