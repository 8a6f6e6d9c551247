#!/usr/bin/env python3
"""How long a small journal-style sync waits while another writer flushes large files.

Models the group commit (append a few KB to a journal, sync, repeat) next to an LSM memtable
flush (write a table of BULK_MB, fsync it, pause, repeat) on the same filesystem, and prints the
sync latency distribution. Run it from the data directory's filesystem; see BENCHMARKS.md,
"Where the ingest tail comes from".

    python3 scripts/disk-sync-stall.py                 # journal alone, then next to 64 MiB and 8 MiB flushes
    python3 scripts/disk-sync-stall.py --dir /data --bulk-mb 64 --sync fdatasync --prealloc falloc
"""
import argparse
import os
import tempfile
import threading
import time


def run(directory, bulk_mb, sync, prealloc, seconds, record_bytes):
    stop = threading.Event()

    def bulk_writer():
        block = os.urandom(1 << 20)
        i = 0
        while not stop.is_set():
            fd = os.open(os.path.join(directory, f"table{i % 4}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            for _ in range(bulk_mb):
                os.write(fd, block)
            os.fsync(fd)
            os.close(fd)
            i += 1
            stop.wait(0.5)

    writer = threading.Thread(target=bulk_writer) if bulk_mb > 0 else None
    if writer:
        writer.start()
    path = os.path.join(directory, "journal")
    if os.path.exists(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    if prealloc == "falloc":
        os.posix_fallocate(fd, 0, 512 << 20)
    elif prealloc == "sparse":
        os.ftruncate(fd, 512 << 20)
    os.fsync(fd)
    sync_fn = os.fsync if sync == "fsync" else os.fdatasync
    record = b"x" * record_bytes
    latencies, offset, end = [], 0, time.monotonic() + seconds
    while time.monotonic() < end:
        os.pwrite(fd, record, offset)
        offset += len(record)
        started = time.perf_counter()
        sync_fn(fd)
        latencies.append(time.perf_counter() - started)
    stop.set()
    if writer:
        writer.join()
    os.close(fd)
    latencies.sort()
    n = len(latencies)

    def ms(q):
        return latencies[min(n - 1, int(n * q))] * 1e3

    slow = sum(1 for x in latencies if x > 0.05)
    print(
        f"bulk {bulk_mb:>3} MiB  {sync:9}  {prealloc:6}  syncs {n:>6}  p50 {ms(0.5):6.2f}  p99 {ms(0.99):6.2f}  "
        f"p99.9 {ms(0.999):7.2f}  max {latencies[-1] * 1e3:7.1f} ms  over 50 ms: {slow}"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="directory on the filesystem to test (default: a temporary directory)")
    p.add_argument("--bulk-mb", type=int, action="append", help="flush size in MiB, 0 for none (repeatable)")
    p.add_argument("--sync", choices=["fsync", "fdatasync"], default="fsync")
    p.add_argument("--prealloc", choices=["none", "sparse", "falloc"], default="sparse",
                   help="journal preallocation (fjall sets the length of a new journal: sparse)")
    p.add_argument("--seconds", type=float, default=12)
    p.add_argument("--record-bytes", type=int, default=6000, help="bytes appended per sync (one group)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        for mb in a.bulk_mb or [0, 64, 8]:
            run(d, mb, a.sync, a.prealloc, a.seconds, a.record_bytes)


if __name__ == "__main__":
    main()
