"""The end-to-end targets, measured in one process: encoder vs end-to-end vs tutorial-style, and bf16 vs fp32.

For 224x224 and 4000x3000 photo-like JPEGs (generated in a temp folder):

* bare encoder images/s at batch size B, bf16 + channels_last (``--precision``), input
  already on the device (:func:`batchcap.tools.bench.measure_encoder`);
* end-to-end ``batchcap run`` images/s at the same B (:func:`batchcap.tools.bench.measure_end_to_end`:
  ``run_job`` into a temp Parquet output), whole run and steady state; ratio to the
  encoder (target >= 0.8);
* the tutorial-style path (:mod:`batchcap.tools.reference`) on the first ``--reference-images``
  of the same pictures; ratio end-to-end / tutorial (target >= 5);

then, on the Flickr8k sample photos, how many bf16 captions are identical to the fp32
ones (target >= 95%; meaningful only with a trained model). Every figure is the median
of ``--repeats`` runs after a warm-up, except the tutorial path (one pass after a warm-up).

    python tests/benchmarks/bench_e2e.py                        # packaged default model
    python tests/benchmarks/bench_e2e.py --standin              # random decoder, same encoder
    python tests/benchmarks/bench_e2e.py --model m.safetensors --batch-size 64 --threads 2
    python tests/benchmarks/bench_e2e.py --device cuda --batch-size 256 --count 4096 --large-count 512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from batchcap.config import BeamConfig, EncoderConfig, ImagePolicy, RuntimeConfig, to_dict  # noqa: E402
from batchcap.encode.torch_backend import build_backbone  # noqa: E402
from batchcap.encode.weights import resolve_encoder_weights  # noqa: E402
from batchcap.hardware import (  # noqa: E402
    default_workers,  # noqa: E402
    resolve_device,
    resolve_precision,
)
from batchcap.model.modelfile import (
    ASSETS_DIR,  # noqa: E402
    load_model,  # noqa: E402
    resolve_model_path,  # noqa: E402
)
from batchcap.pipeline.captioner import Captioner  # noqa: E402
from batchcap.tools.bench import (
    XCEPTION_WEIGHTS_FILE,
    Variant,
    build_variant_encoder,
    machine_info,
    measure_encoder,
    measure_end_to_end,
    measure_reference,
    random_decoder_model,
    write_bench_images,
)

SHARED = Path(os.environ.get("BATCHCAP_SHARED", REPO.parent / "shared"))


def agreement(
    model_path: Path, folder: Path, device: str, batch_size: int, beam: BeamConfig, encoder_weights: str | None
) -> dict[str, object]:
    """Captions of every picture in ``folder`` at fp32 and at bf16: how many are identical."""
    from batchcap.data.loader import iter_batches
    from batchcap.data.sources import open_sources

    model = load_model(model_path)
    policy = ImagePolicy()
    captions: dict[str, dict[str, str]] = {}
    for precision in ("fp32", "bf16"):
        runtime = RuntimeConfig(device=device, precision=precision, batch_size=batch_size, workers=1)
        captioner = Captioner(model, runtime, beam, encoder_weights)
        start = time.perf_counter()
        for batch in iter_batches(
            open_sources([str(folder)], None, policy), model.preprocess, policy, batch_size=batch_size, workers=1
        ):
            if batch.ok:
                for item, cap in zip(batch.ok, captioner(batch.images)):
                    captions.setdefault(item.item.id, {})[precision] = cap.text
        print(f"  captioned {len(captions)} pictures at {precision} in {time.perf_counter() - start:.1f} s", flush=True)
    pairs = [(c["fp32"], c["bf16"]) for c in captions.values()]
    same = sum(a == b for a, b in pairs)
    overlap = [
        len(set(a.split()) & set(b.split())) / max(1, len(set(a.split()) | set(b.split()))) for a, b in pairs if a != b
    ]
    return {
        "images": len(pairs),
        "identical": same,
        "identical_fraction": same / max(1, len(pairs)),
        "differing_mean_word_jaccard": statistics.mean(overlap) if overlap else None,
        "examples": [{"fp32": a, "bf16": b} for a, b in pairs if a != b][:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Model file (default: the packaged default model).")
    parser.add_argument(
        "--standin",
        action="store_true",
        help="Use a random-decoder stand-in with the default model's encoder (no trained "
        "model needed; its captions run to --max-len words; agreement means little).",
    )
    parser.add_argument("--encoder-weights", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="For the encoder and the run (auto: bf16 where native).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--threads", type=int, default=None, help="torch threads in this process (default: torch's).")
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=None)
    parser.add_argument("--count", type=int, default=256, help="224x224 pictures.")
    parser.add_argument("--large-count", type=int, default=64, help="4000x3000 pictures.")
    parser.add_argument("--reference-images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="224x224,4000x3000")
    parser.add_argument("--agreement-folder", default=str(SHARED / "data" / "flickr8k-sample" / "Flicker8k_Dataset"))
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--json", dest="json_out", default=None, help="Also write the results to this file.")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        work = Path(tmp)
        if args.standin:
            model_path = work / "standin.safetensors"
            random_decoder_model(model_path, ASSETS_DIR / XCEPTION_WEIGHTS_FILE)
        else:
            model_path = resolve_model_path(args.model)
        model = load_model(model_path)
        beam = BeamConfig(beam_size=args.beam, max_len=args.max_len or model.max_caption_len)
        runtime = RuntimeConfig(
            device=str(device),
            precision=precision,
            batch_size=args.batch_size,
            workers=args.workers,
            channels_last=True,
        )
        m = machine_info(device)
        results: dict[str, object] = {
            "machine": m,
            "model": model.identity,
            "runtime": to_dict(runtime),
            "beam": beam.beam_size,
            "max_len": beam.max_len,
            "repeats": args.repeats,
        }
        print(
            f"machine: {m['cpu']} ({m['cpus_usable']} usable CPUs) {m.get('gpu', '')} | "
            f"torch {m['torch']}, {torch.get_num_threads()} threads | load average {m['load_average']}"
        )
        print(
            f"model {model.identity} | device {device}, {precision}+channels_last, "
            f"batch {args.batch_size}, workers {args.workers}, beam {beam.beam_size}, "
            f"max_len {beam.max_len} | median of {args.repeats}"
        )
        source = resolve_encoder_weights(model, args.encoder_weights)
        backbone = build_backbone(EncoderConfig(name=model.encoder.name, spatial=model.encoder.spatial), source)
        rows = []
        for size in args.sizes.split(","):
            w, h = (int(v) for v in size.split("x"))
            count = args.count if (w, h) == (224, 224) else args.large_count
            paths = write_bench_images(work / size, count, (w, h))
            variant = Variant(precision, True)
            enc = measure_encoder(
                build_variant_encoder(backbone, model, device, variant, args.batch_size),
                model,
                device,
                variant,
                args.batch_size,
                args.repeats,
            )
            e2e = measure_end_to_end(
                paths, model_path, beam, runtime, ImagePolicy(), args.encoder_weights, args.repeats, work
            )
            ref = measure_reference(
                model, paths[: args.reference_images], args.encoder_weights, device, beam.max_len, beam.min_len
            )
            steady = e2e["steady_images_per_s"]
            row = {
                "size": size,
                "images": count,
                "encoder_images_per_s": enc["images_per_s"],
                "run_steady_images_per_s": steady,
                "run_whole_images_per_s": e2e["whole_run_images_per_s"],
                "run_whole_seconds": e2e["whole_run_seconds"],
                "steady_vs_encoder": steady / enc["images_per_s"] if steady else None,
                "whole_vs_encoder": e2e["whole_run_images_per_s"] / enc["images_per_s"],
                "reference_images_per_s": ref["images_per_s"],
                "reference_images": ref["images"],
                "whole_vs_reference": e2e["whole_run_images_per_s"] / ref["images_per_s"],
            }
            rows.append(row)
            steady_ratio = row["steady_vs_encoder"] or float("nan")
            print(
                f"{size:>9} x{count}: encoder {enc['images_per_s']:8.1f} img/s | run steady "
                f"{(steady or float('nan')):8.1f} img/s ({steady_ratio:.2f} of encoder, "
                f"target >= 0.8) | run whole {e2e['whole_run_images_per_s']:8.1f} img/s "
                f"({row['whole_vs_encoder']:.2f}; {e2e['whole_run_seconds']:.1f} s) | tutorial "
                f"{ref['images_per_s']:6.2f} img/s on {ref['images']} -> run whole is "
                f"{row['whole_vs_reference']:.1f}x (target >= 5)",
                flush=True,
            )
        results["sizes"] = rows
        folder = Path(args.agreement_folder)
        if not args.skip_agreement and folder.is_dir():
            print(f"bf16 vs fp32 captions on {folder} (beam {beam.beam_size}):", flush=True)
            agree = agreement(model_path, folder, str(device), args.batch_size, beam, args.encoder_weights)
            results["agreement"] = agree
            print(
                f"  identical: {agree['identical']} of {agree['images']} = "
                f"{agree['identical_fraction']:.1%} (target >= 95%); differing pairs' mean word Jaccard "
                f"{agree['differing_mean_word_jaccard']}"
            )
            for ex in agree["examples"]:  # type: ignore[union-attr]
                print(f"    fp32: {ex['fp32']!r}\n    bf16: {ex['bf16']!r}")
        elif not args.skip_agreement:
            print(f"bf16 vs fp32 agreement skipped: {folder} not found")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
