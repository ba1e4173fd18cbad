"""Loader start-up at 10^4 .. 10^7 samples: the manifest with per-shard index files (format 2) vs byte ranges
inline (format 1), measured side by side in fresh processes (no video needed: the manifests are synthetic).

    python -m benchmarks.index_scale [--sizes 10000 100000 1000000 10000000] [--per-shard 1000] [--dp 8]

Each case: a fresh Python process opens the bucket (`data_pipeline.loader.ShardSet` on a local directory) and
looks up the keys and byte ranges of rank 0's part of the first global batch (256 samples over --dp ranks),
which computes the epoch permutation and touches the shard indexes it needs. Printed: the start-up time (open +
first batch) and the resident memory the process holds beyond its imports after it. Format 1 is skipped above 10^6 samples (its
manifest alone would be ~0.6 GB of JSON per rank); at 10^7, only the index files the first batches read are
written (the others would never be opened; writing all 10^4 of them takes minutes and ~0.5 GB of disk).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_pipeline.order import global_batch, rank_slice
from data_pipeline.preprocess import FORMAT, MANIFEST
from data_pipeline.shard_index import index_name

BATCH = 256
PROBE = """
import sys, time
import psutil
from data_pipeline.loader import ShardSet
from data_pipeline.order import global_batch, rank_slice
base = psutil.Process().memory_info().rss
t0 = time.perf_counter()
ds = ShardSet(sys.argv[1], "b", workers=1)
mine = rank_slice(global_batch(len(ds), 0, 0, {batch}), 0, {dp})
located = [ds.index.locate(i) for i in mine]
seconds = time.perf_counter() - t0
held = psutil.Process().memory_info().rss
print(seconds, (held - base) / 2**20, ds.index.index_reads, len(located))
"""


def write_case(root: Path, samples: int, per_shard: int, version: int, dp: int, all_indexes: bool) -> None:
    """A synthetic bucket `b`: shards of `per_shard` samples, byte ranges of 4 KiB samples."""
    root.mkdir(parents=True)
    shards, needed = [], None
    if not all_indexes:  # only the shards rank 0's first global batch reads
        needed = {i // per_shard for i in rank_slice(global_batch(samples, 0, 0, BATCH), 0, dp)}
    for j in range((samples + per_shard - 1) // per_shard):
        n = min(per_shard, samples - j * per_shard)
        name = f"b/shard-{j:06d}.tar"
        entry = {"name": name, "samples": n, "bytes": n * 4096, "sha256": "0" * 64}
        offsets = [[f"s{j:06d}_{k:06d}", k * 4096, (k + 1) * 4096] for k in range(n)]
        if version == 1:
            entry["offsets"] = offsets
        else:
            entry["index"] = index_name(name)
            if needed is None or j in needed:
                path = root / entry["index"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"format": "videoar-shard-index", "format_version": 1, "name": name,
                                            "samples": n, "offsets": offsets}))
        shards.append(entry)
    manifest = {"format": FORMAT, "format_version": version, "tokenizer": "synthetic", "created": time.time(),
                "buckets": {"b": {"height": 32, "width": 32, "frames": 5, "samples": samples, "shards": shards}}}
    (root / MANIFEST).write_text(json.dumps(manifest))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**4, 10**5, 10**6, 10**7])
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--dp", type=int, default=8)
    args = parser.parse_args(argv)
    probe = PROBE.format(batch=BATCH, dp=args.dp)
    print(f"{'samples':>10} {'format':>7} {'manifest MB':>12} {'start-up s':>11} {'RSS added MB':>12} "
          f"{'indexes read':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            for version in (1, 2):
                if version == 1 and n > 10**6:
                    print(f"{n:>10} {version:>7}  (skipped: ~{n * 60 / 2**20:.0f} MB of JSON per rank)")
                    continue
                root = Path(tmp) / f"{n}-v{version}"
                write_case(root, n, args.per_shard, version, args.dp, all_indexes=n <= 10**6)
                done = subprocess.run([sys.executable, "-c", probe, str(root)], capture_output=True, text=True,
                                      check=True)
                seconds, rss, reads, _ = done.stdout.split()
                size = (root / MANIFEST).stat().st_size / 2**20
                print(f"{n:>10} {version:>7} {size:>12.1f} {float(seconds):>11.2f} {float(rss):>12.1f} {reads:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
