#!/usr/bin/env python3
"""Benchmark Shoal against Debian's docker-registry (CNCF Distribution 2.8) on one machine.

Run it through `tests/bench/registry-bench.sh`, which builds the release binary first.

For each registry, on a fresh loopback port and fresh temp storage, per repetition:
  push   `skopeo copy oci:IMAGE docker://REGISTRY/bench/img:1`  (wall time, server CPU)
  pull   `skopeo copy docker://REGISTRY/bench/img:1 oci:DIR`     (wall time, server CPU)
  GET    a 64 MiB blob (pushed first) under `wrk -t2 -c4 -d15s`   (req/s, MB/s, server CPU)
and the server's peak RSS (VmHWM) over the whole repetition.

Server CPU is utime+stime of the server process from /proc/<pid>/stat, in seconds
(CLK_TCK ticks), read before and after each phase; it is reported per GB (10^9 bytes)
moved. The image is a busybox layer plus a random layer, so compression cannot help.
Both servers log at warning level (no access log), so logging costs neither much.

With --repeat N the registries take turns going first, the wall times and rates are medians
and the peak RSS is the maximum. Everything lives in one temp directory removed at exit,
and both servers are stopped whatever happens.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(os.path.dirname(HERE), "scripts")
READY_PREFIX = "shoal ready: registry listening on http://"
# Keep the node's peer-to-peer side on loopback: no mDNS multicast, no 0.0.0.0 listeners.
LOOPBACK_P2P_ARGS = ["--no-mdns", "--p2p-listen", "/ip4/127.0.0.1/tcp/0",
                     "--p2p-listen", "/ip4/127.0.0.1/udp/0/quic-v1"]
STARTUP_TIMEOUT_S = 60
COMMAND_TIMEOUT_S = 900
CLK_TCK = os.sysconf(os.sysconf_names["SC_CLK_TCK"])
GB = 1e9
MB = 1e6


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pid):
    """utime + stime of `pid` in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLK_TCK


def peak_rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None, timeout=120):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def run(cmd, timeout=COMMAND_TIMEOUT_S):
    """Runs cmd; returns its wall time in seconds. Fails loudly with its output."""
    start = time.monotonic()
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return wall, proc.stdout



def write_distribution_config(root, data, addr):
    """Writes a docker-registry config (filesystem storage in `data`, deletes on, quiet logs)
    into `root` and returns its path. Shared with swarm_bench.py."""
    config = os.path.join(root, "config.yml")
    with open(config, "w") as f:
        f.write(f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {data}
  delete:
    enabled: true
http:
  addr: {addr}
""")
    return config

class Server:
    """A registry child process; `stop()` is idempotent."""

    name = "?"

    def __init__(self, root):
        self.root = root
        self.proc = None
        self.addr = None

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Shoal(Server):
    name = "Shoal"

    def __init__(self, root, binary):
        super().__init__(root)
        data = os.path.join(root, "data")
        os.makedirs(data)
        env = dict(os.environ, XDG_CONFIG_HOME=root, SHOAL_LOG="warn")
        for var in list(env):
            if var.startswith("SHOAL_") and var != "SHOAL_LOG":
                del env[var]
        self.stderr = open(os.path.join(root, "shoal.log"), "wb")
        self.proc = subprocess.Popen(
            [binary, "node", "--data-dir", data, "--listen", "127.0.0.1:0", *LOOPBACK_P2P_ARGS],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr, env=env,
            text=True)
        found = []

        def read_stdout():
            for line in self.proc.stdout:
                if line.startswith(READY_PREFIX) and not found:
                    found.append(line[len(READY_PREFIX):].strip().rstrip("/"))

        threading.Thread(target=read_stdout, daemon=True).start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not found:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"shoal did not become ready; see {root}/shoal.log")
            time.sleep(0.05)
        self.addr = found[0]


class Distribution(Server):
    name = "Distribution"

    def __init__(self, root):
        super().__init__(root)
        data = os.path.join(root, "data")
        os.makedirs(data)
        self.addr = f"127.0.0.1:{free_port()}"
        config = write_distribution_config(root, data, self.addr)
        self.stderr = open(os.path.join(root, "registry.log"), "wb")
        self.proc = subprocess.Popen(["docker-registry", "serve", config],
                                     stdin=subprocess.DEVNULL, stdout=self.stderr,
                                     stderr=self.stderr)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                if http("GET", f"http://{self.addr}/v2/", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"docker-registry did not start; see {root}/registry.log")
            time.sleep(0.05)


def push_blob(addr, repo, path, digest):
    """POST an upload session, PUT the whole file into it (works on every registry)."""
    status, headers, body = http("POST", f"http://{addr}/v2/{repo}/blobs/uploads/", body=b"")
    if status != 202:
        raise RuntimeError(f"POST upload: {status} {body[:300]!r}")
    location = headers.get("Location") or headers.get("location")
    if location.startswith("/"):
        location = f"http://{addr}{location}"
    sep = "&" if "?" in location else "?"
    with open(path, "rb") as f:
        data = f.read()
    status, _, body = http("PUT", f"{location}{sep}digest={digest}", body=data,
                           headers={"Content-Type": "application/octet-stream",
                                    "Content-Length": str(len(data))}, timeout=600)
    if status != 201:
        raise RuntimeError(f"PUT upload: {status} {body[:300]!r}")


WRK_UNITS = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}


def parse_wrk(out):
    m = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m),", out)
    if not m:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    requests = int(m.group(1))
    duration = float(m.group(2)) * {"ms": 1e-3, "s": 1, "m": 60}[m.group(3)]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return requests, duration, int(bad.group(1)) if bad else 0, errors.group(1) if errors else ""


def measure(server, args, image_dir, image_bytes, blob_path, blob_digest, work):
    """One repetition against one running server; returns a dict of numbers."""
    r = {}
    ref = f"docker://{server.addr}/bench/img:1"

    cpu0 = cpu_seconds(server.pid)
    r["push_wall"], _ = run(["skopeo", "copy", "--dest-tls-verify=false",
                             f"oci:{image_dir}:latest", ref])
    r["push_cpu_per_gb"] = (cpu_seconds(server.pid) - cpu0) / (image_bytes / GB)

    pulled = os.path.join(work, "pulled")
    cpu0 = cpu_seconds(server.pid)
    r["pull_wall"], _ = run(["skopeo", "copy", "--src-tls-verify=false", "--preserve-digests",
                             ref, f"oci:{pulled}:latest"])
    r["pull_cpu_per_gb"] = (cpu_seconds(server.pid) - cpu0) / (image_bytes / GB)
    shutil.rmtree(pulled, ignore_errors=True)

    push_blob(server.addr, "bench/blob", blob_path, blob_digest)
    url = f"http://{server.addr}/v2/bench/blob/blobs/{blob_digest}"
    status, _, body = http("GET", url, timeout=300)
    if status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != blob_digest:
        raise RuntimeError(f"{server.name}: GET of the benchmark blob is wrong (HTTP {status})")
    blob_bytes = len(body)
    del body

    cpu0 = cpu_seconds(server.pid)
    _, out = run(["wrk", f"-t{args.wrk_threads}", f"-c{args.wrk_connections}",
                  f"-d{args.wrk_seconds}s", "--timeout", "60s", url],
                 timeout=args.wrk_seconds + 120)
    cpu = cpu_seconds(server.pid) - cpu0
    requests, duration, bad, socket_errors = parse_wrk(out)
    if bad:
        raise RuntimeError(f"{server.name}: {bad} non-2xx responses under wrk:\n{out}")
    if socket_errors:
        log(f"{server.name}: wrk socket errors: {socket_errors}")
    served = requests * blob_bytes
    r["get_rps"] = requests / duration
    r["get_mbps"] = served / duration / MB
    r["get_cpu_per_gb"] = cpu / (served / GB) if served else float("nan")
    r["peak_rss_mib"] = peak_rss_bytes(server.pid) / (1024 ** 2)
    return r


ROWS = [
    ("push wall time (s)", "push_wall", "{:.2f}"),
    ("push server CPU (CPU-s/GB)", "push_cpu_per_gb", "{:.2f}"),
    ("pull wall time (s)", "pull_wall", "{:.2f}"),
    ("pull server CPU (CPU-s/GB)", "pull_cpu_per_gb", "{:.2f}"),
    ("blob GET (req/s)", "get_rps", "{:.1f}"),
    ("blob GET (MB/s)", "get_mbps", "{:.0f}"),
    ("blob GET server CPU (CPU-s/GB)", "get_cpu_per_gb", "{:.3f}"),
    ("peak RSS (MiB)", "peak_rss_mib", "{:.1f}"),
]


def summarize(runs):
    out = {}
    for _label, key, _fmt in ROWS:
        values = [r[key] for r in runs]
        out[key] = max(values) if key == "peak_rss_mib" else statistics.median(values)
    return out


def version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def main():
    parser = argparse.ArgumentParser(description="Shoal vs Distribution on one machine")
    parser.add_argument("--shoal-bin", required=True, help="release build of shoal")
    parser.add_argument("--image-mib", type=float, default=256,
                        help="random layer size of the pushed image (default 256)")
    parser.add_argument("--blob-mib", type=int, default=64, help="blob served under wrk (64)")
    parser.add_argument("--wrk-seconds", type=int, default=15)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--wrk-connections", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--json", help="also write the raw numbers to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args()

    # A SIGTERM (or CI timeout) still runs the finally blocks below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = tempfile.mkdtemp(prefix="shoal-bench-")
    servers = []
    try:
        log(f"building a {args.image_mib:g} MiB image in {tmp}")
        image_dir = os.path.join(tmp, "image")
        proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, "make-oci-image.py"),
                               image_dir, "--random-mib", str(args.image_mib)],
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                              check=True)
        summary = json.loads(proc.stdout)
        image_bytes = sum(os.path.getsize(os.path.join(dp, f))
                          for dp, _, files in os.walk(os.path.join(image_dir, "blobs"))
                          for f in files)
        blob_path = os.path.join(tmp, "blob.bin")
        sha = hashlib.sha256()
        with open(blob_path, "wb") as f:
            for _ in range(args.blob_mib):
                chunk = os.urandom(1 << 20)
                sha.update(chunk)
                f.write(chunk)
        blob_digest = "sha256:" + sha.hexdigest()

        results = {"Shoal": [], "Distribution": []}
        for rep in range(args.repeat):
            order = ["Shoal", "Distribution"] if rep % 2 == 0 else ["Distribution", "Shoal"]
            for name in order:
                root = os.path.join(tmp, f"{name.lower()}-{rep}")
                os.makedirs(root)
                server = (Shoal(root, args.shoal_bin) if name == "Shoal" else Distribution(root))
                servers.append(server)
                log(f"repetition {rep + 1}/{args.repeat}: {name} at {server.addr}")
                r = measure(server, args, image_dir, image_bytes, blob_path, blob_digest, root)
                server.stop()
                shutil.rmtree(os.path.join(root, "data"), ignore_errors=True)
                log(f"  {json.dumps({k: round(v, 3) for k, v in r.items()})}")
                results[name].append(r)

        shoal, dist = summarize(results["Shoal"]), summarize(results["Distribution"])
        print(f"## Shoal vs Distribution, one machine ({os.cpu_count()} cores)\n")
        print(f"- image: {image_bytes / MB:.0f} MB in 2 layers (random, incompressible), "
              f"manifest {summary['manifest'][:19]}…")
        print(f"- blob GET: one {args.blob_mib} MiB blob, `wrk -t{args.wrk_threads} "
              f"-c{args.wrk_connections} -d{args.wrk_seconds}s`")
        print(f"- {args.repeat} repetition(s), fresh storage each; medians, peak RSS is the max")
        print(f"- shoal: {version([args.shoal_bin, '--version'])}; "
              f"distribution: {version(['docker-registry', '--version'])}; "
              f"{version(['skopeo', '--version'])}")
        print("- server CPU = utime+stime of the server process per GB (10^9 B) moved\n")
        print("| metric | Shoal | Distribution | Shoal/Distribution |")
        print("|---|---:|---:|---:|")
        for label, key, fmt in ROWS:
            ratio = shoal[key] / dist[key] if dist[key] else float("nan")
            print(f"| {label} | {fmt.format(shoal[key])} | {fmt.format(dist[key])} "
                  f"| {ratio:.2f} |")
        print("\nLower is better for wall time, CPU and RSS; higher for req/s and MB/s.")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"runs": results, "shoal": shoal, "distribution": dist}, f, indent=2)
    finally:
        for server in servers:
            server.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
