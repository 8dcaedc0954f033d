"""Under what terms a model file may be used: from what its training records say it learnt from.

batchcap's code is MIT-licensed (``LICENSE``); a model file is not only code. Its weights were
learnt from data sets whose licences travel with what was learnt from them, and its encoder
weights come from elsewhere. :func:`model_terms` reads the model file's own metadata (every
training stage, ``--init-model`` chains, averaged and ensembled members, pretraining text, the
encoder weights it names) and says which sources it finds and the terms of each; when the file
records no training data and is the packaged default model, what that model is known to be
trained on stands in (docs/model-card.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

RESEARCH = "research use"

#: What a training source is, by a word in its format, root or file name; first match wins.
_MS_COCO = "MS-COCO captions (annotations CC BY 4.0; the photos are Flickr photos under their own licences)"
_KNOWN_DATA = (
    ("flickr30k", "Flickr30k captions (Young et al., 2014)", RESEARCH),
    ("flickr8k", "Flickr8k (Hodosh, Young & Hockenmaier, 2013)", RESEARCH),
    ("coco", _MS_COCO, RESEARCH),
    ("everyday", _MS_COCO, RESEARCH),
)
_KERAS_XCEPTION = ("Xception ImageNet weights from Keras (keras-applications)", "MIT")

#: The packaged default model, as docs/model-card.md describes it: used when its file records no data.
DEFAULT_MODEL_SOURCES = (
    ("Flickr8k (Hodosh, Young & Hockenmaier, 2013)", RESEARCH),
    ("Flickr30k captions (Young et al., 2014)", RESEARCH),
    (_MS_COCO, RESEARCH),
    _KERAS_XCEPTION,
)

CODE_LICENCE = "MIT (see LICENSE)"


def _stages(training: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every training record inside ``training``: itself, its --init-model chain, averaged and ensembled members."""
    seen = 0
    stack = [training]
    while stack and seen < 1000:
        record = stack.pop()
        if not isinstance(record, dict) or not record:
            continue
        seen += 1
        yield record
        start = record.get("init_model")
        if isinstance(start, dict):
            stack.append(start.get("training") or {})
        for member in [*(record.get("averaged") or []), *(record.get("ensemble") or [])]:
            if isinstance(member, dict):
                stack.append(member.get("training") or {})


def _data_names(record: dict[str, Any]) -> Iterator[str]:
    """What names each data set of a training record: its label (Karpathy's ``dataset``), format and root.

    ``data`` is one data set's summary, or a list of them (a model trained on several at once).
    """
    data = record.get("data")
    for each in data if isinstance(data, list) else [data]:
        if isinstance(each, dict):
            yield " ".join(str(each.get(k, "")) for k in ("label", "format", "root"))
        elif each:
            yield str(each)
    pretrain = record.get("pretrain")
    if isinstance(pretrain, dict):
        # One text file (``file``), or several (``files``, each with its own ``file``).
        for text in [pretrain, *(pretrain.get("files") or [])]:
            if isinstance(text, dict) and text.get("file"):
                yield str(text["file"])


def _classify(name: str) -> tuple[str, str]:
    lowered = name.lower()
    for word, what, terms in _KNOWN_DATA:
        if word in lowered:
            return what, terms
    return f"unrecognised training data ({name.strip()})", "unknown: ask whoever trained the model"


def model_terms(meta: dict[str, Any], is_default_model: bool = False) -> dict[str, Any]:
    """``{"terms", "sources", "code", "basis"}`` for a model file's metadata.

    ``sources`` lists ``{"source", "terms"}`` for each training data set and the encoder
    weights; ``terms`` sums them up in one sentence (research use only as soon as one source is
    research use only); ``basis`` says whether that was read from the file or assumed.
    """
    sources: dict[str, str] = {}
    for record in _stages(meta.get("training") or {}):
        for name in _data_names(record):
            what, terms = _classify(name)
            sources.setdefault(what, terms)
    basis = "the training records in the model file"
    if not sources and is_default_model:
        sources = dict(DEFAULT_MODEL_SOURCES)
        basis = "what the packaged default model is known to be trained on (docs/model-card.md)"
    encoder = meta.get("encoder") or {}
    weights = str(encoder.get("weights_file") or "")
    if "keras" in weights.lower():
        sources.setdefault(*_KERAS_XCEPTION)
    elif weights or encoder.get("pretrained_tag"):
        sources.setdefault(f"encoder weights {weights or encoder.get('pretrained_tag')}", "see their licence")
    listed = [{"source": what, "terms": terms} for what, terms in sources.items()]
    data = [s for s in listed if _data_source(s["source"])]
    if any(s["terms"] == RESEARCH for s in data):
        summary = (
            "research use only: the model was learnt from data licensed for research use, so the model file "
            "may be used for research, not commercially; batchcap's MIT licence covers the code, not the model"
        )
    elif not data or any(s["terms"].startswith("unknown") for s in data):
        summary = "unknown: the model file does not record (recognisable) training data; ask whoever trained it"
    else:
        summary = "as its sources allow: " + "; ".join(f"{s['source']}: {s['terms']}" for s in listed)
    return {"terms": summary, "sources": listed, "code": CODE_LICENCE, "basis": basis}


def _data_source(source: str) -> bool:
    return source != _KERAS_XCEPTION[0] and not source.startswith("encoder weights")
