"""A committed store of SFT'd checkpoints, so a fresh machine does not retrain what an earlier one trained.

The checkpoint cache (`checkpoint_root`, `.cache/opd/checkpoints/<key>`) lives on one machine; the regime's
teacher takes most of an hour to train on 2 CPU cores, and every session starts on a new machine. The store
(`checkpoint_store`, default `results/models`) holds one `<key>.tar.gz` per model under the same key the
cache uses (the hash of the model, task and SFT config and of a sample of the demonstrations), so a model is
taken from it only when everything it depends on is unchanged. `prepare()` unpacks a stored model into the
cache before it would train one; the held-out evaluations stored beside the checkpoint travel with it.

    python -m opd.train.store add .cache/opd/checkpoints/<key>     # pack a cached model into the store

Archives are byte-reproducible (sorted members, zeroed times and owners), so packing the same checkpoint
twice changes nothing in git.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import sys
import tarfile
import uuid
from pathlib import Path

from opd.train import checkpoints


def archive(store: str | Path, key: str) -> Path:
    return Path(store) / f"{key}.tar.gz"


def add(path: str | Path, store: str | Path) -> Path:
    """Pack the complete cached checkpoint at `path` into `store`/<its key>.tar.gz; returns the archive."""
    path = Path(path)
    if not checkpoints.is_complete(path):
        raise ValueError(f"path: {path} is not a complete checkpoint (it needs {checkpoints.META} and params/)")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".tmp")):
            info = tar.gettarinfo(str(f), arcname=str(f.relative_to(path)))
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with f.open("rb") as fh:
                tar.addfile(info, fh)
    out = archive(store, checkpoints.read_meta(path).get("key", path.name))  # the key prepare() looks up
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with tmp.open("wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
        gz.write(buf.getvalue())
    os.replace(tmp, out)
    return out


def unpack(key: str, store: str | Path, root: str | Path) -> Path | None:
    """The stored model `key` unpacked into the cache `root`/<key> (atomically: parallel jobs may race), or
    None when the store does not hold it."""
    src = archive(store, key)
    if not src.is_file():
        return None
    dest = Path(root) / key
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with tarfile.open(src, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
        checkpoints.publish(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="pack a cached checkpoint into the store")
    a.add_argument("path", nargs="+", help="cached checkpoint directories (<checkpoint_root>/<key>)")
    a.add_argument("--store", default="results/models")
    args = ap.parse_args(argv)
    bad = [p for p in args.path if not checkpoints.is_complete(p)]
    if bad:  # before any archive is written
        try:
            add(bad[0], args.store)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    for p in args.path:
        out = add(p, args.store)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
