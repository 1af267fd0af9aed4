#!/usr/bin/env python3
"""Build a small multi-layer OCI image layout directory without network access.

Layer 1 is a gzipped tar holding Debian's static busybox at /bin/busybox and
symlinks for the usual applets (/bin/sh, /bin/echo, ...). Layer 2 is a gzipped
tar holding one file of N MiB of random bytes, so compression does not shrink
it (useful for benchmarks). The config says amd64/linux, lists the diff_ids
(sha256 of each uncompressed tar) and runs `echo hello from shoal`.

The result is a standard OCI image layout (oci-layout, index.json, blobs/)
that `skopeo copy oci:DIR:TAG ...` accepts.

Usage:
    make-oci-image.py OUT_DIR [--random-mib N] [--random-layers K] [--seed S]
                              [--tag TAG] [--busybox PATH]

With --random-layers K the N MiB of random bytes are cut into K layers of about
N/K MiB each (a multi-layer image of the same total).

Every file is written while it is hashed: no layer is held in memory, so a
multi-gigabyte random layer is fine.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile

APPLETS = ["sh", "echo", "ls", "cat", "true", "false", "env", "sleep", "uname", "id"]
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
CHUNK = 1 << 20


class HashingWriter(io.RawIOBase):
    """A write-only file object that hashes and counts every byte passed to `inner`."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self):
        return True

    def write(self, data):
        view = memoryview(data)
        self.sha.update(view)
        self.size += len(view)
        self.inner.write(view)
        return len(view)

    def digest(self):
        return "sha256:" + self.sha.hexdigest()


class RandomReader(io.RawIOBase):
    """Reads `size` pseudo-random bytes from a seeded generator."""

    def __init__(self, size, rng):
        super().__init__()
        self.remaining = size
        self.rng = rng

    def readable(self):
        return True

    def readinto(self, buf):
        n = min(len(buf), self.remaining, CHUNK)
        if n <= 0:
            return 0
        buf[:n] = self.rng.randbytes(n)
        self.remaining -= n
        return n


def tar_info(name, kind, size=0, mode=0o755, target=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.linkname = target
    return info


def write_layer(blobs_tmp, add_members, compresslevel):
    """Write a tar.gz layer into a temp file; return (path, digest, size, diff_id)."""
    fd, path = tempfile.mkstemp(dir=blobs_tmp, prefix="layer-")
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "wb") as raw:
        compressed = HashingWriter(raw)
        # mtime=0 and no file name make the gzip header deterministic.
        with gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0, filename="",
                           compresslevel=compresslevel) as gz:
            uncompressed = HashingWriter(gz)
            buffered = io.BufferedWriter(uncompressed, buffer_size=CHUNK)
            with tarfile.open(fileobj=buffered, mode="w|", format=tarfile.PAX_FORMAT,
                              bufsize=CHUNK) as tar:
                add_members(tar)
            buffered.flush()
        raw.flush()
        os.fsync(raw.fileno())
    return path, compressed.digest(), compressed.size, uncompressed.digest()


def busybox_members(busybox):
    def add(tar):
        tar.addfile(tar_info("bin", tarfile.DIRTYPE))
        size = os.path.getsize(busybox)
        with open(busybox, "rb") as f:
            tar.addfile(tar_info("bin/busybox", tarfile.REGTYPE, size=size), f)
        for applet in APPLETS:
            tar.addfile(tar_info("bin/" + applet, tarfile.SYMTYPE, mode=0o777, target="busybox"))
        tar.addfile(tar_info("tmp", tarfile.DIRTYPE, mode=0o1777))
    return add


def random_members(size, rng):
    def add(tar):
        tar.addfile(tar_info("data", tarfile.DIRTYPE))
        tar.addfile(tar_info("data/random.bin", tarfile.REGTYPE, size=size, mode=0o644),
                    RandomReader(size, rng))
    return add


def put_blob(out, path_or_bytes, digest):
    algo, hexd = digest.split(":", 1)
    dest_dir = os.path.join(out, "blobs", algo)
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, hexd)
    if isinstance(path_or_bytes, bytes):
        with open(dest, "wb") as f:
            f.write(path_or_bytes)
    else:
        os.replace(path_or_bytes, dest)


def json_blob(obj):
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output OCI layout directory (created; must be empty)")
    parser.add_argument("--random-mib", type=float, default=8.0,
                        help="size of the random layer's file in MiB (default 8)")
    parser.add_argument("--random-layers", type=int, default=1,
                        help="cut the random bytes into this many layers (default 1)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for the random layer (default: random, printed)")
    parser.add_argument("--tag", default="latest", help="ref name in index.json (default latest)")
    parser.add_argument("--busybox", default="/bin/busybox",
                        help="static busybox binary (default /bin/busybox)")
    args = parser.parse_args()

    if not os.path.isfile(args.busybox):
        sys.exit(f"make-oci-image: {args.busybox} not found (apt-get install busybox-static)")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 63)
    print(f"make-oci-image: seed {seed}", file=sys.stderr)
    rng = random.Random(seed)
    random_bytes = int(args.random_mib * (1 << 20))

    os.makedirs(args.out, exist_ok=True)
    if os.listdir(args.out):
        sys.exit(f"make-oci-image: {args.out} is not empty")
    tmp = os.path.join(args.out, ".tmp")
    os.makedirs(tmp)
    try:
        if args.random_layers < 1:
            sys.exit("make-oci-image: --random-layers must be at least 1")
        parts = args.random_layers
        sizes = [random_bytes // parts + (1 if i < random_bytes % parts else 0)
                 for i in range(parts)]
        layers = [write_layer(tmp, busybox_members(args.busybox), compresslevel=6)]
        # Random bytes do not compress: level 1 only wraps them quickly.
        layers += [write_layer(tmp, random_members(size, rng), compresslevel=1)
                   for size in sizes]
        for path, digest, _size, _diff in layers:
            put_blob(args.out, path, digest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            "Cmd": ["/bin/sh", "-c", "echo hello from shoal"],
        },
        "rootfs": {"type": "layers", "diff_ids": [diff for _p, _d, _s, diff in layers]},
        "history": [{"created_by": "make-oci-image.py: busybox"}] + [
            {"created_by": f"make-oci-image.py: {size} random bytes"} for size in sizes
        ],
    }
    config_bytes, config_digest = json_blob(config)
    put_blob(args.out, config_bytes, config_digest)

    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": [
            {"mediaType": MEDIA_LAYER, "digest": digest, "size": size}
            for _p, digest, size, _diff in layers
        ],
    }
    manifest_bytes, manifest_digest = json_blob(manifest)
    put_blob(args.out, manifest_bytes, manifest_digest)

    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": len(manifest_bytes),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": args.tag},
        }],
    }
    with open(os.path.join(args.out, "index.json"), "wb") as f:
        f.write(json_blob(index)[0])
    with open(os.path.join(args.out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)

    # Machine-readable summary on stdout for callers (tests, benchmark).
    print(json.dumps({
        "manifest": manifest_digest,
        "config": config_digest,
        "layers": [{"digest": d, "size": s, "diff_id": diff} for _p, d, s, diff in layers],
        "seed": seed,
    }))


if __name__ == "__main__":
    main()
