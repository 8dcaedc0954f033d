"""Which int8 recipe keeps the captions: NNCF post-training quantisation variants against fp32, on dev photos.

For each recipe the encoder's fp32 OpenVINO graph is quantised on the same calibration
photos, every dev photo is encoded with it, and the captions of one fixed search (the
model's decoder in fp32, beam 3, the model's word rules) are compared with the captions
of the fp32 encoder's features: the share of captions equal, CIDEr-D against the
references (batchcap's tokenisation, so comparable between recipes, not with ``eval``'s),
and the cosine of the grid features. ``accuracy-control-DROP`` is NNCF's accuracy-aware
quantisation, validated on other training photos by the grid features' cosine to fp32's.
OpenVINO bf16 is measured the same way, as the precision ``auto`` runs today. Then the
bare encoder's rate, batch 16, for each recipe and bf16, alternating over
``--rounds`` rounds (run it on a quiet machine).

``auto`` may choose int8 only for a recipe that keeps >= 90 % of captions equal to fp32's
and dev CIDEr-D within 0.005 (docs/performance.md). Results are written to ``--out`` after
every recipe, and a rerun skips the recipes already there (quantising takes minutes).

    python tests/benchmarks/int8_recipes.py ../shared/data/flickr8k \\
        ../shared/data/everyday-captioned/dataset_everyday.json --calibration ../shared/data/flickr8k \\
        --out int8-recipes.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from batchcap.data.captions.factory import load_caption_dataset  # noqa: E402
from batchcap.encode.openvino_backend import ENV_STREAMS, compile_graph, stream_settings  # noqa: E402
from batchcap.encode.quantize import calibration_arrays, calibration_photos  # noqa: E402
from batchcap.pipeline.api import load_model  # noqa: E402
from batchcap.training.metrics import score_captions  # noqa: E402


def recipes() -> dict[str, dict[str, Any]]:
    """NNCF ``quantize`` keyword sets by name; ``shipped`` is batchcap's recipe today."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    shipped: dict[str, Any] = {"preset": nncf.QuantizationPreset.PERFORMANCE, "fast_bias_correction": True}
    depthwise_kept = nncf.IgnoredScope(types=["GroupConvolution"])
    return {
        "shipped": shipped,
        "depthwise-kept": {**shipped, "ignored_scope": depthwise_kept},
        "full-bias-correction": {**shipped, "fast_bias_correction": False},
        "mixed": {**shipped, "preset": nncf.QuantizationPreset.MIXED},
        "mixed-depthwise-kept": {**shipped, "preset": nncf.QuantizationPreset.MIXED, "ignored_scope": depthwise_kept},
        "smoothquant-conv": {
            **shipped,
            "model_type": nncf.ModelType.TRANSFORMER,
            "advanced_parameters": AdvancedQuantizationParameters(
                smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=0.15, matmul=-1)
            ),
        },
    }


def accuracy_controlled(
    model: Any, calibration: list[np.ndarray], validation: list[np.ndarray], max_drop: float
) -> Any:
    """NNCF's accuracy-aware quantisation: layers go back to floating point, worst first, until the mean
    cosine of the grid features to fp32's on ``validation`` (training photos) is within ``max_drop`` of 1."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    reference = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    items = [(image, np.asarray(reference(image)[0], dtype=np.float32)) for image in validation]

    def cosine_to_fp32(compiled: Any, data: Any) -> tuple[float, list[float]]:
        values = []
        for image, fp32 in data:
            out = np.asarray(compiled(image)[0], dtype=np.float32).ravel()
            values.append(float(out @ fp32.ravel() / (np.linalg.norm(out) * np.linalg.norm(fp32) + 1e-12)))
        return float(np.mean(values)), values

    return nncf.quantize_with_accuracy_control(
        model,
        nncf.Dataset(calibration),
        nncf.Dataset(items, lambda item: item[0]),
        cosine_to_fp32,
        max_drop=max_drop,
        subset_size=len(calibration),
        preset=nncf.QuantizationPreset.PERFORMANCE,
        fast_bias_correction=True,
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(ranking_subset_size=len(items)),
    )


#: One request at a time, so one stream on every core (as the table in docs/performance.md was measured).
ONE_STREAM = stream_settings({ENV_STREAMS: "1"})


def encode_all(compiled: Any, images: np.ndarray, batch: int = 16) -> np.ndarray:
    request = compiled.create_infer_request()
    out = []
    for start in range(0, len(images), batch):
        result = request.infer({0: np.ascontiguousarray(images[start : start + batch])}, share_outputs=False)
        out.append(np.asarray(result[0], dtype=np.float32))
    return np.concatenate(out)


def search_all(captioner: Any, features: np.ndarray, batch: int = 64) -> list[str]:
    texts: list[str] = []
    for start in range(0, len(features), batch):
        texts += [c.text for c in captioner.search(torch.from_numpy(features[start : start + batch]))]
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", help="caption datasets whose val split is scored")
    parser.add_argument("--calibration", required=True, help="dataset or photo folder to calibrate on")
    parser.add_argument("--model", default=None, help="model file (default: the shipped model)")
    parser.add_argument("--only", default="", help="comma-separated recipe names (default: all)")
    parser.add_argument("--limit", type=int, default=0, help="first N val photos of each dataset (0: all)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the bare-encoder timing (0: skip)")
    parser.add_argument("--time-images", type=int, default=160)
    parser.add_argument("--control-photos", type=int, default=128, help="training photos accuracy control validates on")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import openvino as ov
    from nncf import Dataset, quantize

    available = recipes()
    wanted = [n for n in args.only.split(",") if n] or list(available)
    unknown = [n for n in wanted if n not in available and not n.startswith("accuracy-control-")]
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}: use {sorted(available)} or accuracy-control-DROP")

    captioner = load_model(args.model, precision="fp32", backend="openvino")._captioner
    preprocess = captioner.model.preprocess
    fp32_xml = Path(captioner.encoder.xml)

    ids: list[str] = []
    paths: list[str] = []
    references: dict[str, list[str]] = {}
    for source in args.datasets:
        records = load_caption_dataset(source).splits["val"]
        records = records[: args.limit] if args.limit else records
        for r in records:
            key = f"{Path(source).name}/{r.image_id}"
            ids.append(key)
            paths.append(str(r.path))
            references[key] = list(r.captions)
    print(f"decoding {len(paths)} val photos", flush=True)
    images = np.concatenate(calibration_arrays(paths, preprocess))  # decoded as the encoder sees them
    if len(images) != len(paths):
        raise SystemExit(f"{len(paths) - len(images)} val photos could not be decoded")

    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    if results.setdefault("photos", len(ids)) != len(ids):  # a rerun adds to the same table, or to none
        raise SystemExit(f"{args.out} holds results for {results['photos']} photos, not {len(ids)}: use another --out")
    graphs: dict[str, Path] = {"bf16": fp32_xml}
    work = args.out.with_suffix(".graphs")
    work.mkdir(exist_ok=True)

    def groups(texts: list[str], fp32_texts: list[str] | None) -> dict[str, Any]:
        """CIDEr-D per dataset and pooled, and the share of captions equal to ``fp32_texts`` (when given)."""
        by_set: dict[str, Any] = {}
        for prefix in sorted({k.split("/")[0] for k in ids}) + ["all"]:
            keep = [i for i, k in enumerate(ids) if prefix == "all" or k.startswith(prefix + "/")]
            predictions = {ids[i]: texts[i] for i in keep}
            scores = score_captions(predictions, {ids[i]: references[ids[i]] for i in keep}, full=False)
            entry: dict[str, Any] = {"CIDEr-D": round(float(scores["CIDEr"]), 4)}  # type: ignore[arg-type]
            if fp32_texts is not None:
                entry["equal"] = sum(texts[i] == fp32_texts[i] for i in keep) / len(keep)
            by_set[prefix] = entry
        return by_set

    started = time.perf_counter()
    fp32_features = encode_all(compile_graph(fp32_xml, "fp32", ONE_STREAM), images)
    fp32_texts = search_all(captioner, fp32_features)
    results["fp32"] = {"scores": groups(fp32_texts, None), "seconds": round(time.perf_counter() - started, 1)}
    print("fp32", results["fp32"], flush=True)

    def measure(name: str, xml: Path, precision: str, extra: dict[str, Any]) -> None:
        features = encode_all(compile_graph(xml, precision, ONE_STREAM), images)
        cos = torch.nn.functional.cosine_similarity(
            torch.from_numpy(features).flatten(1), torch.from_numpy(fp32_features).flatten(1)
        )
        texts = search_all(captioner, features)
        entry = {
            **extra,
            "cosine_mean": round(float(cos.mean()), 5),
            "cosine_min": round(float(cos.min()), 5),
            "scores": groups(texts, fp32_texts),
        }
        for group, value in entry["scores"].items():
            value["delta_CIDEr-D"] = round(value["CIDEr-D"] - results["fp32"]["scores"][group]["CIDEr-D"], 4)
        results[name] = entry
        args.out.write_text(json.dumps(results, indent=1))
        print(name, json.dumps(entry), flush=True)

    if "bf16" not in results:
        measure("bf16", fp32_xml, "bf16", {})
    calibration_set = calibration_photos(args.calibration)
    calibration = calibration_arrays(calibration_set, preprocess)
    # Validation for accuracy control: other training photos, never the dev photos scored here.
    others = [p for p in calibration_photos(args.calibration, 3 * len(calibration_set)) if p not in calibration_set]
    validation = calibration_arrays(others[: args.control_photos], preprocess)
    for name in wanted:
        xml = work / f"{name}.xml"
        if not xml.exists():
            started = time.perf_counter()
            model = ov.Core().read_model(str(fp32_xml))
            if name.startswith("accuracy-control-"):
                quantised = accuracy_controlled(model, calibration, validation, float(name.rsplit("-", 1)[1]))
            else:
                quantised = quantize(model, Dataset(calibration), subset_size=len(calibration), **available[name])
            ov.save_model(quantised, str(xml))
            seconds = round(time.perf_counter() - started, 1)
        else:
            seconds = results.get(name, {}).get("quantise_seconds")
        graphs[name] = xml
        if name not in results:
            measure(name, xml, "int8", {"quantise_seconds": seconds})

    if args.rounds:
        batch = images[: args.time_images]
        rates: dict[str, list[float]] = {n: [] for n in ["bf16", *wanted]}
        compiled = {n: compile_graph(graphs[n], "bf16" if n == "bf16" else "int8", ONE_STREAM) for n in rates}
        for n in rates:
            encode_all(compiled[n], batch[:32])  # warm-up
        for _ in range(args.rounds):
            for n in rates:
                t0 = time.perf_counter()
                encode_all(compiled[n], batch)
                rates[n].append(len(batch) / (time.perf_counter() - t0))
        for n, values in rates.items():
            results.setdefault(n, {})["img_per_s"] = [round(v, 1) for v in values]
            results[n]["x_bf16"] = round(statistics.median(values) / statistics.median(rates["bf16"]), 2)
            print(n, results[n]["img_per_s"], results[n]["x_bf16"], flush=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
