"""The self-describing model file: one ``.safetensors`` with decoder weights + JSON metadata.

Layout (format version 1):

* tensors ``decoder.*`` -- the caption decoder's state dict (fp32 or fp16);
  optionally ``encoder.*`` -- the encoder's own weights, when embedded;
* metadata key ``batchcap.format`` = ``"batchcap-model"``, ``batchcap.format_version`` = ``"1"``,
  and ``batchcap.meta`` = a JSON document holding everything needed to rebuild and trust
  the model: encoder name and weights identity, resolved preprocessing, decoder
  hyper-parameters, vocabulary, caption length, training summary and metrics, and
  ``tensors_sha256`` -- a hash over every tensor's name, dtype, shape and bytes.

Optional, for trusting captions (files without them still load):

* ``ending_rule`` -- ``{"unendable_words": [...], "unendable_pairs": [[determiner, word], ...], ...}``,
  the words ``<end>`` may not follow (:func:`batchcap.model.text.learn_unendable`; absent,
  :data:`batchcap.model.text.FALLBACK_UNENDABLE`) and the word pairs it may not follow
  (:func:`batchcap.model.text.learn_unendable_pairs`; absent, none);
* ``repeat_rule`` -- ``{"repeatable_words": [...], ...}``, the words that may follow themselves
  (:func:`batchcap.model.text.learn_repeatable`); absent, none may;
* ``familiarity`` + tensors ``familiarity.mean|components|variances`` -- the training
  pictures' feature statistics (:class:`batchcap.model.confidence.Familiarity`);
* ``neighbours`` (their reference captions) + tensor ``familiarity.neighbours`` (those
  pictures as whitened unit vectors): :class:`batchcap.model.confidence.Neighbours`;
* ``calibration`` -- the confidence calibrator's coefficients and its fitting report
  (:class:`batchcap.model.confidence.Calibrator`); absent, the ``confidence`` column is null.

An ensemble (:mod:`batchcap.model.ensemble`) is format version 2, so that a batchcap which would
caption with its first decoder alone refuses it: ``decoder.*`` is member 0, tensors
``ensemble.<i>.*`` are member ``i >= 1``, ``ensemble`` = ``{"combine": rule, "decoders": [...]}``
holds the hyper-parameters of members 1, 2, ... (member 0's are the top-level ``decoder``), and
``training.ensemble`` lists every member's ``identity`` and ``training`` record, once.
Single-decoder files stay version 1.

An ensemble of decoders fine-tuned with their own exit flows (``--finetune-exit-flow``) is format
version 4: ``encoder.*`` is member 0's exit flow, tensors ``exit_flow.<i>.*`` are member ``i``'s, and
``ensemble.exit_flows`` = ``"per_member"``. The encoder runs the shared trunk once and every member's
exit flow on it; the features are the members' maps side by side, and each decoder reads its own
(:class:`batchcap.model.ensemble.EnsembleDecoder`). An earlier batchcap, which would feed member 0's
features to every decoder, refuses the file.

Loading reads the header with plain JSON, never unpickles, and refuses files that are
not batchcap models, come from a newer format, are truncated or corrupt.
Saving writes a temp file beside the target and ``os.replace``s it.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from batchcap.config import BeamConfig, DecoderConfig, Preprocess, from_dict, to_dict
from batchcap.fileio import atomic_save_safetensors, file_sha256, tensors_sha256
from batchcap.model.confidence import Calibrator, Familiarity, Neighbours
from batchcap.model.decoder import CaptionDecoder
from batchcap.model.ensemble import EnsembleDecoder
from batchcap.model.text import FALLBACK_UNENDABLE, Vocabulary

FORMAT_NAME = "batchcap-model"
FORMAT_VERSION = 4  # the newest this batchcap reads; other files are still written as 1, 2 or 3
ENSEMBLE_FORMAT_VERSION = 2
# A decoder with caption styles: an earlier batchcap would not know their tensor, so it must refuse the file
# ("upgrade batchcap") rather than call it corrupt.
STYLES_FORMAT_VERSION = 3
# An ensemble whose members each read their own exit flow's features.
MEMBER_EXIT_FLOWS_FORMAT_VERSION = 4
#: ``ensemble.exit_flows`` of such a file.
PER_MEMBER = "per_member"
_MAX_HEADER = 100 * 1024 * 1024


class ModelFileError(Exception):
    """A model file that cannot be used, with a message that says why and what to do."""


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoder produced the training features, so captioning uses the same one.

    ``weights_sha256`` identifies the local weights file (``None`` for timm's pretrained
    download, identified by ``pretrained_tag``); ``weights_file`` is the file name to
    look for beside the model file and among the packaged assets.

    ``finetuned`` is ``"exit_flow"`` when the file stores a fine-tuned exit flow
    (:mod:`batchcap.encode.exit_flow`) to load over those weights; empty otherwise (a file whose
    whole encoder is embedded names no weights at all).
    """

    name: str = "legacy_xception"
    pretrained_tag: str | None = None
    weights_sha256: str | None = None
    weights_file: str | None = None
    spatial: bool = True
    feature_dim: int = 2048
    finetuned: str = ""


@dataclass(frozen=True)
class DecoderMember:
    """One decoder of a model file: hyper-parameters, weights, and where it came from."""

    config: DecoderConfig
    state: dict[str, torch.Tensor]
    identity: str
    training: dict[str, Any] = field(default_factory=dict)
    #: The member's own fine-tuned exit flow, in an ensemble whose members each have one; else None.
    exit_flow: dict[str, torch.Tensor] | None = None


@dataclass
class CaptionModel:
    """A loaded model file: configs, vocabulary and tensors, ready to build modules from."""

    encoder: EncoderSpec
    preprocess: Preprocess
    decoder: DecoderConfig
    vocab: Vocabulary
    max_caption_len: int
    decoder_state: dict[str, torch.Tensor]
    encoder_state: dict[str, torch.Tensor] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    name: str = "batchcap-model"
    tensors_sha256: str = ""
    path: str | None = None
    unendable_words: tuple[str, ...] | None = None  # None: not stored, the fallback applies
    unendable_pairs: tuple[tuple[str, str], ...] | None = None  # None: not stored, no pair is unendable
    ending_rule: dict[str, Any] = field(default_factory=dict)  # how unendable_words and pairs were learnt
    repeatable_words: tuple[str, ...] | None = None  # None: not stored, no word may follow itself
    repeat_rule: dict[str, Any] = field(default_factory=dict)  # how repeatable_words were learnt
    familiarity: Familiarity | None = None
    neighbours: Neighbours | None = None
    calibration: Calibrator | None = None
    #: An ensemble's members after the first (``decoder`` / ``decoder_state``); empty for one decoder.
    extra_decoders: tuple[DecoderMember, ...] = ()
    combine: str = "logprob"  # how an ensemble's log-probabilities are combined (batchcap.model.ensemble)

    def decoders(self) -> list[DecoderMember]:
        """Every decoder of the file, member 0 first (a single-decoder model has one).

        In an ensemble with an exit flow per member, member 0's ``exit_flow`` is the file's ``encoder_state``.
        """
        if self.extra_decoders:
            records = self.training.get("ensemble") or []
            first: dict[str, Any] = records[0] if records else {"identity": self.identity, "training": {}}
            own = self.encoder_state if self.exit_flow_per_member else None
            return [
                DecoderMember(self.decoder, self.decoder_state, first["identity"], first.get("training") or {}, own),
                *self.extra_decoders,
            ]
        return [DecoderMember(self.decoder, self.decoder_state, self.identity, self.training)]

    @property
    def exit_flow_per_member(self) -> bool:
        """An ensemble whose decoders each read the features of their own fine-tuned exit flow."""
        return any(member.exit_flow is not None for member in self.extra_decoders)

    def member_exit_flows(self) -> tuple[dict[str, torch.Tensor], ...]:
        """The exit flows of members 1, 2, ... that the encoder runs beside member 0's; empty when they share one."""
        if not self.exit_flow_per_member:
            return ()
        return tuple(member.exit_flow or {} for member in self.extra_decoders)

    @property
    def unendable_ids(self) -> tuple[int, ...]:
        """Ids of the words ``<end>`` may not follow: the stored set, else the built-in fallback."""
        words = FALLBACK_UNENDABLE if self.unendable_words is None else self.unendable_words
        return self.vocab.ids_of(words)

    @property
    def unendable_pair_ids(self) -> tuple[tuple[int, int], ...]:
        """Id pairs ``<end>`` may not follow (both words in the vocabulary): the stored pairs, else none."""
        index = {w: i for i, w in enumerate(self.vocab.words)}
        pairs = self.unendable_pairs or ()
        return tuple((index[a], index[b]) for a, b in pairs if a in index and b in index)

    @property
    def repeatable_ids(self) -> tuple[int, ...]:
        """Ids of the words that may follow themselves: the stored exceptions, else none."""
        return self.vocab.ids_of(self.repeatable_words or ())

    def word_rules(self, beam: BeamConfig) -> dict[str, Any]:
        """The word rules' keywords of :func:`batchcap.model.beam.beam_search` under ``beam``'s switches:
        one place that turns the model file's rules and ``--no-ending-rule`` / ``--allow-repeated-words``
        into a search, for captioning and dev sweeps alike."""
        return {
            "unendable_ids": self.unendable_ids if beam.ending_rule else (),
            "unendable_pairs": self.unendable_pair_ids if beam.ending_rule else (),
            "block_repeats": not beam.allow_repeated_words,
            "repeatable_ids": self.repeatable_ids,
        }

    def encoder_weights_id(self) -> str:
        """What this model's features depend on among weights: the file or download, and any encoder
        tensors the file stores (a fine-tuned exit flow, a whole embedded encoder). Feature caches are
        keyed by it, so a fine-tuned encoder never reuses the stock encoder's cached features."""
        enc = self.encoder
        base = enc.weights_sha256 or f"pretrained:{enc.pretrained_tag}"
        if self.encoder_state is None:
            return base
        stored = tensors_sha256(self.encoder_state)
        for flow in self.member_exit_flows():
            stored += "+" + tensors_sha256(flow)
        return f"{base}+{enc.finetuned}:{stored}" if enc.finetuned else f"embedded:{stored}"

    @property
    def identity(self) -> str:
        """``name@hash12``: what the output's ``model`` column records."""
        return f"{self.name}@{self.tensors_sha256[:12]}"

    def metadata(self) -> dict[str, Any]:
        """The JSON document stored in the file (and printed by ``batchcap info``)."""
        return {
            "name": self.name,
            "encoder": to_dict(self.encoder),
            "preprocess": to_dict(self.preprocess),
            "decoder": to_dict(self.decoder),
            "vocabulary": list(self.vocab.words),
            "special_tokens": {"pad": 0, "start": 1, "end": 2, "unk": 3},
            "max_caption_len": self.max_caption_len,
            "training": self.training,
            "metrics": self.metrics,
            "tensors_sha256": self.tensors_sha256,
            "encoder_embedded": (
                False if self.encoder_state is None else "exit_flow" if self.encoder.finetuned else True
            ),
            **self._word_rules(),
            **({"familiarity": self.familiarity.meta()} if self.familiarity is not None else {}),
            **({"neighbours": self.neighbours.meta()} if self.neighbours is not None else {}),
            **({"calibration": self.calibration.to_dict()} if self.calibration is not None else {}),
            **({"ensemble": self._ensemble_meta()} if self.extra_decoders else {}),
        }

    def _ensemble_meta(self) -> dict[str, Any]:
        """The ``ensemble`` metadata key: how members combine, members 1..'s hyper-parameters, their exit flows."""
        meta: dict[str, Any] = {"combine": self.combine, "decoders": [to_dict(m.config) for m in self.extra_decoders]}
        if self.exit_flow_per_member:
            meta["exit_flows"] = PER_MEMBER
        return meta

    def _word_rules(self) -> dict[str, Any]:
        """The ``ending_rule`` and ``repeat_rule`` metadata keys, each only when it holds something learnt."""
        rules: dict[str, Any] = {}
        ending = dict(self.ending_rule)
        if self.unendable_words is not None:
            ending["unendable_words"] = list(self.unendable_words)
        if self.unendable_pairs is not None:
            ending["unendable_pairs"] = [list(pair) for pair in self.unendable_pairs]
        if self.unendable_words is not None or self.unendable_pairs is not None:
            rules["ending_rule"] = ending
        if self.repeatable_words is not None:
            rules["repeat_rule"] = {**self.repeat_rule, "repeatable_words": list(self.repeatable_words)}
        return rules

    def build_decoder(self, dtype: torch.dtype | None = None) -> CaptionDecoder | EnsembleDecoder:
        """The decoder module with this file's weights, in eval mode, fp32 (or ``dtype``).

        For an ensemble, an :class:`batchcap.model.ensemble.EnsembleDecoder` of all members: the
        same ``init_state`` / ``step`` / ``per_image_state`` interface, so searches need not know.
        With an exit flow per member, each member reads its own slice of the features.
        """

        modules = []
        for member in self.decoders():
            module = CaptionDecoder(member.config, dtype=dtype)
            module.load_state_dict({k: v.float() for k, v in member.state.items()})
            modules.append(module.eval())
        if len(modules) == 1:
            return modules[0]

        return EnsembleDecoder(modules, self.combine, split_features=self.exit_flow_per_member).eval()


def save_model(model: CaptionModel, path: str | os.PathLike[str], half: bool = False) -> CaptionModel:
    """Save ``model`` atomically; ``half=True`` stores floating tensors as fp16 (an embedded whole encoder stays fp32).

    Returns the model with ``tensors_sha256`` set to the hash of what was written.
    """

    def stored(v: torch.Tensor) -> torch.Tensor:
        return v.half() if half and v.is_floating_point() else v

    tensors = {f"decoder.{k}": stored(v) for k, v in model.decoder_state.items()}
    for i, member in enumerate(model.extra_decoders, 1):
        tensors.update({f"ensemble.{i}.{k}": stored(v) for k, v in member.state.items()})
        if member.exit_flow is not None:
            tensors.update({f"exit_flow.{i}.{k}": stored(v) for k, v in member.exit_flow.items()})
    if model.encoder_state is not None:  # a fine-tuned exit flow halves like the decoder (the base file is fp16)
        tensors.update(
            {f"encoder.{k}": stored(v) if model.encoder.finetuned else v for k, v in model.encoder_state.items()}
        )
    if model.familiarity is not None:
        tensors.update(model.familiarity.tensors())
    if model.neighbours is not None:
        tensors.update(model.neighbours.tensors())
    model.tensors_sha256 = tensors_sha256(tensors)
    metadata = {
        "batchcap.format": FORMAT_NAME,
        "batchcap.format_version": str(_format_version(model)),
        "batchcap.meta": json.dumps(model.metadata(), sort_keys=True),
    }
    atomic_save_safetensors(tensors, path, metadata)
    return model


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The safetensors JSON header of ``path``, after checking the file is complete.

    Raises ``ModelFileError`` for a missing, non-safetensors, truncated or padded file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise ModelFileError(f"{path}: not a batchcap model file (too short to be safetensors)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(_MAX_HEADER, size - 8):
            raise ModelFileError(
                f"{path}: not a batchcap model file, or truncated (header claims {header_len} bytes, "
                f"file has {size}); re-download or re-train it"
            )
        raw_header = fh.read(header_len)
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: not a batchcap model file (header is not safetensors JSON)") from exc
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: not a batchcap model file (unexpected header)")
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    expected = 8 + header_len + data_end
    if size < expected:
        raise ModelFileError(f"{path}: truncated model file ({size} of {expected} bytes); re-download or re-train it")
    if size > expected:
        raise ModelFileError(f"{path}: corrupt model file ({size - expected} unexpected trailing bytes)")
    return header


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The batchcap metadata document of a model file, without loading tensors."""
    header = read_header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("batchcap.format") != FORMAT_NAME:
        raise ModelFileError(
            f"{path}: not a batchcap model file (a safetensors file without batchcap metadata; "
            "encoder weights go to --encoder-weights, models to --model)"
        )
    try:
        version = int(meta.get("batchcap.format_version", ""))
    except ValueError as exc:
        raise ModelFileError(f"{path}: corrupt model file (bad format version)") from exc
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {version} is newer than this batchcap understands "
            f"({FORMAT_VERSION}); upgrade batchcap (pip install -U batchcap)"
        )
    try:
        return json.loads(meta["batchcap.meta"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: corrupt model file (unreadable batchcap metadata)") from exc


def load_model(path: str | os.PathLike[str], verify: bool = True) -> CaptionModel:
    """Load and validate a model file; never executes code from it."""
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFileError(f"{path}: corrupt model file ({exc})") from exc
    if verify and tensors_sha256(tensors) != meta.get("tensors_sha256"):
        raise ModelFileError(
            f"{path}: corrupt model file (tensor checksum does not match the one recorded); re-download or re-train it"
        )
    try:
        ending, repeat = meta.get("ending_rule") or {}, meta.get("repeat_rule") or {}
        vocab = Vocabulary(tuple(meta["vocabulary"]))
        decoder = from_dict(DecoderConfig, meta["decoder"])
        model = CaptionModel(
            name=meta.get("name", "batchcap-model"),
            encoder=from_dict(EncoderSpec, meta["encoder"]),
            preprocess=from_dict(Preprocess, meta["preprocess"]),
            decoder=decoder,
            vocab=vocab,
            max_caption_len=int(meta["max_caption_len"]),
            decoder_state={k[len("decoder.") :]: v for k, v in tensors.items() if k.startswith("decoder.")},
            encoder_state={k[len("encoder.") :]: v for k, v in tensors.items() if k.startswith("encoder.")} or None,
            training=meta.get("training", {}),
            metrics=meta.get("metrics", {}),
            tensors_sha256=meta.get("tensors_sha256", ""),
            path=str(path),
            unendable_words=tuple(ending["unendable_words"]) if "unendable_words" in ending else None,
            unendable_pairs=(
                tuple((str(a), str(b)) for a, b in ending["unendable_pairs"]) if "unendable_pairs" in ending else None
            ),
            ending_rule={k: v for k, v in ending.items() if k not in ("unendable_words", "unendable_pairs")},
            repeatable_words=tuple(repeat["repeatable_words"]) if "repeatable_words" in repeat else None,
            repeat_rule={k: v for k, v in repeat.items() if k != "repeatable_words"},
            familiarity=Familiarity.from_file(tensors, meta["familiarity"]) if "familiarity" in meta else None,
            neighbours=Neighbours(
                tensors["familiarity.neighbours"],
                meta["neighbours"]["captions"],
                int(meta["neighbours"]["k"]),
                meta["neighbours"].get("temperature"),  # absent: fitted before the weighting, pooled
                _neighbour_datasets(meta["neighbours"].get("datasets")),
            )
            if "neighbours" in meta
            else None,
            calibration=Calibrator.from_dict(meta["calibration"]) if "calibration" in meta else None,
            extra_decoders=_extra_decoders(tensors, meta.get("ensemble"), meta.get("training") or {}),
            combine=(meta.get("ensemble") or {}).get("combine", "logprob"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: corrupt model file (metadata incomplete: {exc})") from exc
    for member in model.decoders():
        if len(vocab) != member.config.vocab_size:
            raise ModelFileError(
                f"{path}: corrupt model file (vocabulary has {len(vocab)} words, decoder expects "
                f"{member.config.vocab_size})"
            )
    return model


def _extra_decoders(
    tensors: dict[str, torch.Tensor], ensemble: dict[str, Any] | None, training: dict[str, Any]
) -> tuple[DecoderMember, ...]:
    """Members 1.. of an ensemble file: ``ensemble.<i>.*`` tensors, hyper-parameters, training records."""
    if not ensemble:
        return ()
    records = training["ensemble"]
    per_member = ensemble.get("exit_flows") == PER_MEMBER
    members = []
    for i, config in enumerate(ensemble["decoders"], 1):
        state = _prefixed(tensors, f"ensemble.{i}.")
        if not state:
            raise KeyError(f"tensors of ensemble member {i}")
        exit_flow = _prefixed(tensors, f"exit_flow.{i}.") if per_member else None
        if per_member and not exit_flow:
            raise KeyError(f"exit-flow tensors of ensemble member {i}")
        members.append(
            DecoderMember(
                from_dict(DecoderConfig, config),
                state,
                records[i]["identity"],
                records[i].get("training") or {},
                exit_flow,
            )
        )
    return tuple(members)


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefix``, under the rest of their names."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def check_encoder_weights(model: CaptionModel, weights_path: str | os.PathLike[str]) -> str:
    """Refuse encoder weights whose sha256 differs from the one the model was trained with."""
    digest = file_sha256(weights_path)
    expected = model.encoder.weights_sha256
    if expected and digest != expected:
        raise ModelFileError(
            f"encoder weights {weights_path} (sha256 {digest[:12]}…) are not the ones this model was "
            f"trained with (sha256 {expected[:12]}…, file {model.encoder.weights_file or '?'}); "
            "pass the matching --encoder-weights or retrain the decoder on these weights"
        )
    return digest


#: The packaged files: the default model and the ImageNet Xception weights it references.
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = ASSETS_DIR / "default-model.safetensors"


def resolve_model_path(model: str | None) -> Path:
    """``--model`` as given, or the model shipped inside the package."""
    if model:
        return Path(model)
    if not DEFAULT_MODEL.is_file():
        raise ModelFileError(
            f"no --model given and the packaged default model is missing ({DEFAULT_MODEL}); "
            "reinstall batchcap or pass --model FILE"
        )
    return DEFAULT_MODEL


#: What ``EncoderSpec.finetuned`` says when the model file holds the fine-tuned exit flow.
EXIT_FLOW = "exit_flow"


def _neighbour_datasets(stored: dict[str, Any] | None) -> list[str] | None:
    """Each neighbour's dataset name from the metadata's ``{"names", "index"}`` (None: not recorded)."""
    if stored is None:
        return None
    names = list(stored["names"])
    return [names[int(i)] for i in stored["index"]]


def _format_version(model: CaptionModel) -> int:
    """The oldest format version that describes ``model``: 4 for an ensemble with an exit flow per member,
    3 with caption styles, 2 for another ensemble, else 1."""
    if model.exit_flow_per_member:
        return MEMBER_EXIT_FLOWS_FORMAT_VERSION
    if any(member.config.styles for member in model.decoders()):
        return STYLES_FORMAT_VERSION
    return ENSEMBLE_FORMAT_VERSION if model.extra_decoders else 1
