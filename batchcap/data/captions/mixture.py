"""Several caption datasets used together: one merged dataset, and which dataset each image came from.

Training, calibration and evaluation read a merged :class:`CaptionDataset` (the splits of every
dataset, in the order given), so the feature cache, the vocabulary and the steps work as they do
for one dataset; :class:`DatasetMix` remembers each image's dataset so that an epoch can draw from
the datasets by weight and validation can be scored per dataset. Image ids must be unique across the
datasets (the feature cache is keyed by id): the same id naming two different files is refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from batchcap.data.captions.records import CaptionDataset, CaptionRecord, DatasetError


def dataset_name(dataset: CaptionDataset) -> str:
    """A short name for reports: the layout's own name when it has one, else the file or folder name.

    ``flickr8k/`` -> ``flickr8k``; ``dataset_everyday.json`` -> ``everyday``; ``captions_val2014.json``
    -> ``val2014``.
    """
    base = os.path.basename(os.path.normpath(dataset.root))
    stem = re.sub(r"\.(json|txt|csv|tar)$", "", base, flags=re.IGNORECASE)
    return re.sub(r"^(dataset_|captions_)", "", stem) or base or dataset.format


@dataclass
class DatasetMix:
    """Datasets trained (or calibrated, or scored) together, and their merged splits.

    ``weights`` are the shares of an epoch's draws (empty: every training image once per epoch);
    ``owner`` maps an image id to the index of its dataset.
    """

    datasets: list[CaptionDataset]
    names: list[str]
    weights: tuple[float, ...]
    merged: CaptionDataset
    owner: dict[str, int]

    @property
    def several(self) -> bool:
        return len(self.datasets) > 1

    def ids_of(self, index: int, ids: Sequence[str]) -> list[str]:
        """Those of ``ids`` that belong to dataset ``index``, in their order."""
        return [i for i in ids if self.owner.get(i) == index]

    def summary(self) -> dict[str, Any] | list[dict[str, Any]]:
        """What a model file records: one dataset's summary as before, or one per dataset with its weight."""
        if not self.several:
            return self.datasets[0].summary()
        return [
            {"name": name, **dataset.summary(), **({"weight": self.weights[n]} if self.weights else {})}
            for n, (name, dataset) in enumerate(zip(self.names, self.datasets))
        ]


def mix_datasets(
    datasets: Sequence[CaptionDataset], weights: Sequence[float] = (), val_images: int | None = None
) -> DatasetMix:
    """Merge ``datasets`` (one: returned as it is); ``val_images`` keeps the first N val images of each.

    Raises :class:`DatasetError` when the weights do not match the datasets or an id names two files.
    """
    datasets = list(datasets)
    if not datasets:
        raise DatasetError("no dataset given")
    if weights and len(weights) != len(datasets):
        raise DatasetError(
            f"{len(weights)} dataset weights for {len(datasets)} datasets: give one --dataset-weight per DATA, "
            "in the order of DATA (or none: every training image once per epoch)"
        )
    if any(not w > 0 for w in weights):
        raise DatasetError(f"dataset weights must be positive numbers, got {list(weights)}")
    names = dataset_names(datasets)
    if len(datasets) == 1:
        only = datasets[0]
        owner = {r.image_id: 0 for records in only.splits.values() for r in records}
        return DatasetMix(datasets, names, tuple(weights), only, owner)
    owner = {}
    where: dict[str, str | None] = {}
    splits: dict[str, list[CaptionRecord]] = {}
    missing: dict[str, list[str]] = {}
    notes: list[str] = []
    for index, (name, dataset) in enumerate(zip(names, datasets)):
        for split, records in dataset.splits.items():
            kept = records[:val_images] if split == "val" and val_images is not None else records
            for record in kept:
                place = record.path or f"{record.shard}#{record.key}"
                if record.image_id in owner:
                    if where[record.image_id] != place or owner[record.image_id] != index:
                        raise DatasetError(
                            f"{name} and {names[owner[record.image_id]]} both hold an image with id "
                            f"{record.image_id!r}: image ids must be unique across the datasets trained together "
                            "(the feature cache and the reports key pictures by id); rename one of them"
                        )
                    continue
                owner[record.image_id] = index
                where[record.image_id] = place
                splits.setdefault(split, []).append(record)
        for split, ids in dataset.missing.items():
            missing.setdefault(split, []).extend(ids)
        notes += [f"{name}: {note}" for note in dataset.notes]
    merged = CaptionDataset(
        "+".join(d.format for d in datasets), " + ".join(d.root for d in datasets), splits, missing, notes
    )
    return DatasetMix(datasets, names, tuple(weights), merged, owner)


def dataset_names(datasets: Sequence[CaptionDataset]) -> list[str]:
    """:func:`dataset_name` of each, a repeated one numbered (``flickr8k``, ``flickr8k-2``)."""
    out: list[str] = []
    for name in (dataset_name(d) for d in datasets):
        candidate, n = name, 1
        while candidate in out:
            n += 1
            candidate = f"{name}-{n}"
        out.append(candidate)
    return out
