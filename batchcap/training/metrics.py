"""Caption metrics: the standard COCO caption scorers from ``pycocoevalcap``.

Tokenisation decides whether scores compare with published numbers. With Java on the
PATH we use the COCO toolkit's own ``PTBTokenizer`` (Stanford CoreNLP's PTB tokenizer,
lower-cased, punctuation removed) and METEOR 1.5, exactly as the published Flickr8k/COCO
results do. Without Java, METEOR is skipped (and the result says so) and tokenisation
falls back to :func:`batchcap.model.text.normalize_caption`, which differs from PTB only in
details (e.g. it folds ``man 's`` into ``mans``); such scores are marked
``tokenizer: batchcap``.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Mapping, Sequence

from batchcap.model.text import normalize_caption

INSTALL_HINT = "pip install pycocoevalcap"


class MetricsUnavailable(Exception):
    """The COCO caption scorers cannot be imported; the message names the install command."""


def require_metrics() -> None:
    """Fail fast, before any captioning, when ``pycocoevalcap`` is missing.

    It is a regular dependency of batchcap, so this only happens in environments built
    without it (``pip install --no-deps``, a vendored copy); ``eval`` and ``train`` call
    this first instead of failing after minutes of work.
    """
    try:
        found = importlib.util.find_spec("pycocoevalcap") is not None
    except (ImportError, ValueError):  # a blocked or half-installed package
        found = False
    if not found:
        raise MetricsUnavailable(
            f"the caption metrics need pycocoevalcap, which is not installed: "
            f"run `{INSTALL_HINT}` (or reinstall batchcap) and retry"
        )


def java_available() -> bool:
    """True when a ``java`` executable is on the PATH (PTB tokenizer and METEOR need it)."""
    return shutil.which("java") is not None


def _tokenize(captions: Mapping[str, Sequence[str]], ptb: bool) -> dict[str, list[str]]:
    if ptb:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    return {k: [" ".join(normalize_caption(c)) for c in v] for k, v in captions.items()}


def score_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    full: bool = True,
    use_java: bool | None = None,
) -> dict[str, object]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of ``predictions`` against ``references``.

    ``full=False`` computes only BLEU and CIDEr with batchcap tokenisation (fast, no
    subprocess): what training uses to select the best epoch.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    ids = sorted(predictions)
    if not ids:
        raise ValueError("no captions to score")
    java = java_available() if use_java is None else use_java
    ptb = full and java
    refs = _tokenize({i: list(references[i]) for i in ids}, ptb)
    hyps = _tokenize({i: [predictions[i]] for i in ids}, ptb)
    scores: dict[str, object] = {"images": len(ids), "tokenizer": "ptb" if ptb else "batchcap"}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    for n, value in enumerate(bleu, start=1):
        scores[f"BLEU-{n}"] = float(value)
    cider, _ = Cider().compute_score(refs, hyps)
    scores["CIDEr"] = float(cider)
    if full:
        from pycocoevalcap.rouge.rouge import Rouge

        rouge, _ = Rouge().compute_score(refs, hyps)
        scores["ROUGE-L"] = float(rouge)
        if java:
            from pycocoevalcap.meteor.meteor import Meteor

            meteor = Meteor()
            try:
                value, _ = meteor.compute_score(refs, hyps)
            finally:
                meteor.close() if hasattr(meteor, "close") else None
            scores["METEOR"] = float(value)
        else:
            scores["METEOR"] = None
            scores["note"] = "METEOR skipped: no java on PATH (install a JRE to compute it)"
    return scores
