"""Issue 15 benchmark: S3Store put and get of ~1 GB in 32 MiB objects to SeaweedFS on loopback,
beside boto3 doing the same transfers with the same parallelism (multipart upload_file, and plain
single-request put_object / get_object), with peak RSS of each side (/usr/bin/time -v).

    python benches/bench_s3store.py            # 1 GiB (32 x 32 MiB), 3 runs, medians
    python benches/bench_s3store.py --quick    # 256 MiB, 1 run (smoke test)

Each transfer runs in its own process (this script with --worker) so that its peak RSS is its own;
the time is measured inside that process, around the transfer only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

MiB = 1 << 20
OBJECT = 32 * MiB
PARALLEL = 4  # objects at once, for every contender
PART = 8 * MiB
PART_CONCURRENCY = 2


def worker(args: argparse.Namespace) -> None:
    """One transfer, in this process; prints {"seconds": ...}."""
    files = sorted(Path(args.files).iterdir())
    if args.tool == "ours":
        from theta_store.s3store import S3Store

        store = S3Store(
            f"s3://{args.bucket}/{args.prefix}", args.endpoint, parallel=PARALLEL, part_size=PART, part_concurrency=PART_CONCURRENCY
        )
        objs = [(p.name, p, p.stat().st_size) for p in files]  # the names are the files' BLAKE3, made below
        t0 = time.perf_counter()
        if args.op == "put":
            stats = store.put(objs)
            assert stats.bytes_sent == sum(n for _, _, n in objs), stats
        else:
            with ThreadPoolExecutor(PARALLEL) as pool:
                got = sum(pool.map(lambda o: len(store.get(o[0], [(0, o[2])])[0]), objs))
            assert got == sum(n for _, _, n in objs)
        seconds = time.perf_counter() - t0
    else:
        import boto3
        from boto3.s3.transfer import TransferConfig

        client = boto3.client("s3", endpoint_url=args.endpoint)
        config = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=PART_CONCURRENCY)
        keys = [(f"{args.prefix}/frames/{p.name}", p) for p in files]

        def put_multipart(kp: tuple[str, Path]) -> None:
            client.upload_file(str(kp[1]), args.bucket, kp[0], Config=config)

        def put_plain(kp: tuple[str, Path]) -> None:
            with open(kp[1], "rb") as f:
                client.put_object(Bucket=args.bucket, Key=kp[0], Body=f)

        def get_plain(kp: tuple[str, Path]) -> int:
            body = client.get_object(Bucket=args.bucket, Key=kp[0])["Body"]
            n = 0
            view = memoryview(bytearray(OBJECT))
            while chunk := body.read(PART):
                view[n : n + len(chunk)] = chunk
                n += len(chunk)
            return n

        op = {"put": put_multipart if args.tool == "boto3" else put_plain, "get": get_plain}[args.op]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(op, keys))
        seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds}))


def run_worker(tool: str, op: str, files: Path, server: object, prefix: str) -> tuple[float, float, float]:
    """(seconds, peak RSS MB, CPU seconds) of one transfer in a fresh process; the CPU seconds
    include the interpreter's start (the same for every contender)."""
    env = dict(os.environ, **server.env())  # type: ignore[attr-defined]
    env.pop("AWS_ENDPOINT_URL", None)
    cmd = [sys.executable, __file__, "--worker", "--tool", tool, "--op", op, "--files", str(files)]
    cmd += ["--endpoint", server.endpoint, "--bucket", server.bucket, "--prefix", prefix]  # type: ignore[attr-defined]
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{tool} {op} failed:\n{r.stdout}\n{r.stderr}")
    fields = dict(line.strip().rsplit(": ", 1) for line in r.stderr.splitlines() if ": " in line)
    rss = int(fields["Maximum resident set size (kbytes)"]) / 1024
    cpu = float(fields["User time (seconds)"]) + float(fields["System time (seconds)"])
    return json.loads(r.stdout.strip().splitlines()[-1])["seconds"], rss, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=0)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--tool")
    ap.add_argument("--op")
    ap.add_argument("--files")
    ap.add_argument("--endpoint")
    ap.add_argument("--bucket")
    ap.add_argument("--prefix")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    try:
        import boto3  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "boto3>=1.34,<2"], check=True)
    import blake3

    from common import write_json
    from servers import seaweedfs

    count = 8 if args.quick else 32
    runs = args.runs or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        work = Path(tmp)
        files = work / "objects"
        files.mkdir()
        for _ in range(count):
            data = os.urandom(OBJECT)
            (files / blake3.blake3(data).hexdigest()).write_bytes(data)
        total = count * OBJECT
        results: dict[str, dict[str, list[float]]] = {}
        with seaweedfs(work / "seaweedfs") as server:
            for run in range(runs):
                for tool in ("ours", "boto3", "plain"):
                    prefix = f"{tool}{run}"
                    for op in ("put", "get"):
                        if tool == "plain" and op == "get":
                            continue  # boto3's get above is already one plain GET per object
                        before = server.counters()
                        seconds, rss, cpu = run_worker(tool, op, files, server, prefix)
                        sent = server.counters() - before
                        r = results.setdefault(f"{tool} {op}", {"s": [], "rss": [], "cpu": [], "requests": []})
                        r["s"].append(seconds)
                        r["rss"].append(rss)
                        r["cpu"].append(cpu)
                        r["requests"].append(sent.count())
        print(f"{count} objects of {OBJECT // MiB} MiB = {total / MiB:.0f} MiB, SeaweedFS on 127.0.0.1, {runs} run(s), medians")
        print(f"{'':12} {'MB/s':>8} {'s':>7} {'client CPU s':>13} {'peak RSS MB':>12} {'requests':>9}")
        med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in results.items()}
        for k, m in med.items():
            print(f"{k:12} {total / 1e6 / m['s']:8.0f} {m['s']:7.2f} {m['cpu']:13.2f} {m['rss']:12.0f} {m['requests']:9.0f}")
        for op, base in (("put", "boto3 put"), ("put", "plain put"), ("get", "boto3 get")):
            ours = med[f"ours {op}"]
            print(f"ours {op} / {base}: {med[base]['s'] / ours['s']:.2f}x the throughput, {ours['cpu'] / med[base]['cpu']:.2f}x the CPU")
        write_json("bench_s3store", {"objects": count, "object_bytes": OBJECT, "runs": runs, "medians": med})


if __name__ == "__main__":
    main()
