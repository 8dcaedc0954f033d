"""How specific and how right a model's words are, from ``batchcap eval --json`` files.

Model comparison, not a benchmark. CIDEr-D rewards the words most references share, so two models
can score alike while one writes "a plate topped with broccoli and vegetables" and the other "a plate
of food sitting on a table". For each data set of each eval file this prints:

* **distinct words**: how many different words the captions use over the whole dev set;
* **content words in the references**: the share of each caption's content words (its words after
  :data:`FUNCTION_WORDS` are removed) that one of the picture's references also uses, averaged over
  pictures: whether the specific words it does write are right.

    python tests/benchmarks/caption_words.py single.json pair.json

Both come from the captions and references ``batchcap eval --json`` stores; words are normalised as
training normalises captions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from batchcap.model.text import normalize_caption

#: Words that carry no picture content: articles, prepositions, auxiliaries, common verbs of position.
FUNCTION_WORDS = frozenset(
    "a an the is are of on in with to and at its it his her their by for from some two three "
    "sitting standing next top front near while who that this there up down through into over".split()
)


def word_figures(captions: list[dict[str, Any]]) -> dict[str, float]:
    """Distinct words and the mean share of content words found in the references, over ``captions``."""
    distinct: set[str] = set()
    shares = []
    for row in captions:
        words = normalize_caption(row["caption"])
        distinct.update(words)
        referenced = {w for reference in row["references"] for w in normalize_caption(reference)}
        content = [w for w in words if w not in FUNCTION_WORDS]
        if content:
            shares.append(sum(w in referenced for w in content) / len(content))
    return {
        "pictures": len(captions),
        "distinct_words": len(distinct),
        "content_words_in_references": round(sum(shares) / max(1, len(shares)), 3),
    }


def datasets_of(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """An eval report's per-data-set results (a one-DATA report is its own only data set)."""
    return report["datasets"] if "datasets" in report else {Path(str(report.get("data", "data"))).stem: report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="batchcap eval --json files")
    args = parser.parse_args()
    for path in args.reports:
        report = json.loads(path.read_text(encoding="utf-8"))
        for name, result in datasets_of(report).items():
            print(
                json.dumps(
                    {
                        "report": path.name,
                        "model": result.get("model"),
                        "data": name,
                        **word_figures(result["captions"]),
                    }
                )
            )


if __name__ == "__main__":
    main()
