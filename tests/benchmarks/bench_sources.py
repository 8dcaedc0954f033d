"""Rate of ``batchcap run`` on the same pictures from a folder, a Parquet image table and a local S3 server.

A benchmark, not a test: it prints each source's rate and its ratio to the folder's, from runs that
alternate between the sources on one machine (medians). The table is laid out as img2dataset writes
one (``key`` and ``jpg`` columns); the S3 server is moto's, started on 127.0.0.1 in this process, so
its CPU time counts against the S3 runs on a small machine.

    python tests/benchmarks/bench_sources.py PHOTOS [--count 300] [--rounds 3] [--workers 1] [--model M]

Needs the test extra (moto, s3fs). Every run's output is checked to hold ``--count`` rows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from remote_servers import moto_s3  # noqa: E402  (the tests' own server helper)
from timed_run import first_pictures, run_once  # noqa: E402  (beside this script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", type=Path, help="a folder of pictures (the first --count by name are used)")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", default=None, help="model file; default: the shipped model")
    args = parser.parse_args()
    import s3fs

    pictures = first_pictures(args.photos, args.count)
    extra = ["--workers", str(args.workers)] + (["--model", args.model] if args.model else [])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "photos"
        folder.mkdir()
        for p in pictures:
            shutil.copy(p, folder / p.name)
        table = root / "photos.parquet"
        columns = {"key": [p.stem for p in pictures], "jpg": [p.read_bytes() for p in pictures]}
        pq.write_table(pa.table(columns), table, row_group_size=64)
        with moto_s3() as endpoint:
            fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
            fs.mkdir("photos-bucket")
            for p in pictures:
                fs.put_file(str(p), f"photos-bucket/photos/{p.name}")
            sources = {"folder": str(folder), "table": str(table), "s3": "s3://photos-bucket/photos/"}
            run_once(str(folder), root / "warm-up.parquet", len(pictures), extra)
            rates: dict[str, list[tuple[float, float]]] = {name: [] for name in sources}
            for _ in range(args.rounds):
                for name, source in sources.items():
                    rates[name].append(run_once(source, root / f"{name}.parquet", len(pictures), extra))
    whole = {name: statistics.median(w for w, _ in r) for name, r in rates.items()}
    summary = {name: statistics.median(s for _, s in r) for name, r in rates.items()}
    print(f"{len(pictures)} pictures, {args.rounds} rounds, medians; CPUs: {os.cpu_count()}")
    for name in sources:
        print(
            f"{name:7s} whole run {whole[name]:6.1f} img/s ({whole[name] / whole['folder']:.2f} of the folder's), "
            f"summary {summary[name]:6.1f} img/s ({summary[name] / summary['folder']:.2f})"
        )


if __name__ == "__main__":
    main()
