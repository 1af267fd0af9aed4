#!/usr/bin/env python3
"""Swarm rollout benchmark: N pullers fetch one image at once over shaped links.

Run it through `tests/bench/swarm-bench.sh` (builds the release binary, needs root).

Topology, built once for the largest N (all names start with a per-run prefix):
  - a hub namespace `<prefix>hub` holding a bridge `br0` (198.18.1.254/24);
  - namespaces `<prefix>n0` .. `<prefix>nN`; node i has `eth0` = 198.18.1.(i+1)/24, a veth to
    the bridge (`v<i>` on the hub side);
  - every link is shaped with tbf in both directions: egress of `eth0` in the node's namespace
    (its uploads) and egress of `v<i>` in the hub (its downloads).
The bridge lives in its own namespace rather than the root one: the root namespace here has
br_netfilter on and an iptables FORWARD policy of DROP, which would drop bridged traffic, and
this benchmark must not touch the host's firewall. Nothing is created in the root namespace.
Only 198.18.1.0/24 (inside RFC 2544's benchmarking range 198.18.0.0/15) is ever used.

For each N (e.g. 8 and 16):
  Shoal: shoal in n0 (publisher) and n1..nN (`--peer` n0, `--trust` its key); the image is
  pushed to n0 from inside n0 (timed on its own, not over a shaped link); once every puller lists
  the tag, every puller starts a full pull from its own node at the same moment; the all-done
  time is when the last one finishes. Origin egress = n0's `served_bytes` and n0's eth0 tx bytes.
  Registry (a): Debian's docker-registry in n0 holding the same image (pushed from inside n0);
  all pullers pull from it at once; origin egress = n0's eth0 tx bytes.
Ideal (b): image bytes / link rate, and one puller pulling alone from docker-registry.
Loopback: two shoal nodes on 127.0.0.1 (root namespace, no shaping); the big blob is pushed to
one and GET from the other with curl (it fetches it from the first) -> MB/s, and how steadily
the body streamed: the share of the pull's time at which 25%, 50% and 75% of the bytes were in.

The pull client is skopeo (`skopeo copy docker://... oci:DIR`, digests checked by skopeo) or,
with --client curl, curl of the manifest and each blob to /dev/null.

Every process started is stopped, every namespace deleted, the temp dir removed at exit.
"""

import argparse
import datetime
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.parse

from registry_bench import write_distribution_config
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(os.path.dirname(HERE), "scripts")
READY_PREFIX = "shoal ready: registry listening on http://"
PEER_PREFIX = "shoal p2p: peer id "
KEY_PREFIX = "shoal publisher key: "
SUBNET = "198.18.1"
HUB_ADDR = f"{SUBNET}.254"
REPO, TAG = "bench/img", "1"
STARTUP_TIMEOUT_S = 60
MB = 1e6
MIB = 1 << 20


def log(msg):
    print(f"swarm-bench [{time.strftime('%H:%M:%S')}]: {msg}", file=sys.stderr, flush=True)


def sh(cmd, check=True, timeout=600, capture=True):
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=capture, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                           f"{proc.stdout}\n{proc.stderr}")
    return proc


def peak_rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


CLK_TCK = os.sysconf(os.sysconf_names["SC_CLK_TCK"])


def cpu_seconds(pid):
    """utime + stime of `pid` in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def addr(i):
    return f"{SUBNET}.{i + 1}"


class Topology:
    """Hub namespace with a bridge, one namespace per node, tbf on both directions."""

    def __init__(self, prefix, nodes, mbit, burst, latency):
        self.prefix = prefix
        self.hub = f"{prefix}hub"
        self.ns = [f"{prefix}n{i}" for i in range(nodes)]
        self.created = []
        self.mbit = mbit
        try:
            self._build(burst, latency)
        except BaseException:
            self.destroy()
            raise

    def _build(self, burst, latency):
        tbf = ["tbf", "rate", f"{self.mbit}mbit", "burst", burst, "latency", latency]
        sh(["ip", "netns", "add", self.hub])
        self.created.append(self.hub)
        sh(["ip", "-n", self.hub, "link", "set", "lo", "up"])
        sh(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        sh(["ip", "-n", self.hub, "addr", "add", f"{HUB_ADDR}/24", "dev", "br0"])
        sh(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for i, ns in enumerate(self.ns):
            sh(["ip", "netns", "add", ns])
            self.created.append(ns)
            sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            sh(["ip", "-n", self.hub, "link", "add", f"v{i}", "type", "veth",
                "peer", "name", "eth0", "netns", ns])
            sh(["ip", "-n", self.hub, "link", "set", f"v{i}", "master", "br0"])
            sh(["ip", "-n", self.hub, "link", "set", f"v{i}", "up"])
            sh(["ip", "-n", ns, "addr", "add", f"{addr(i)}/24", "dev", "eth0"])
            sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
            # Uploads of node i: egress of its eth0. Downloads: egress of the hub side.
            sh(["ip", "-n", ns, "link", "set", "eth0", "txqueuelen", "1000"])
            sh(["tc", "-n", ns, "qdisc", "replace", "dev", "eth0", "root", *tbf])
            sh(["tc", "-n", self.hub, "qdisc", "replace", "dev", f"v{i}", "root", *tbf])

    def tx_bytes(self, i):
        """Bytes node i has sent on its link (all headers included)."""
        out = sh(["ip", "-n", self.ns[i], "-s", "-j", "link", "show", "eth0"]).stdout
        return json.loads(out)[0]["stats64"]["tx"]["bytes"]

    def destroy(self):
        for ns in reversed(self.created):
            # Anything still inside (it should not be) is ours: stop it by pid.
            pids = sh(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            sh(["ip", "netns", "del", ns], check=False)
        self.created = []


class Proc:
    """A child process (optionally inside a namespace); stop() is idempotent."""

    def __init__(self, cmd, log_path, ns=None, env=None, stdout_lines=False):
        full = (["ip", "netns", "exec", ns] if ns else []) + cmd
        self.log = open(log_path, "wb")
        self.lines = []
        self.proc = subprocess.Popen(full, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if stdout_lines else self.log,
                                     stderr=self.log, env=env,
                                     text=stdout_lines or None)
        if stdout_lines:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def p2p_addrs(ip, port, transport):
    """The libp2p listen addresses for `transport`: QUIC, TCP (TLS or noise, yamux), or both,
    as a node has by default."""
    tcp, quic = f"/ip4/{ip}/tcp/{port}", f"/ip4/{ip}/udp/{port}/quic-v1"
    return {"tcp": [tcp], "quic": [quic], "both": [quic, tcp]}[transport]


def p2p_addr(ip, port, transport):
    """`p2p_addrs` as one `--p2p-listen` value."""
    return ",".join(p2p_addrs(ip, port, transport))


def peer_arg(addrs, peer_id):
    """A `--peer` value: `peer_id` at each of `addrs`."""
    return ",".join(f"{a}/p2p/{peer_id}" for a in addrs)


_FLAGS = {}


def supports_flag(binary, flag):
    """Whether `shoal node --help` of this binary lists `flag` (benchmarks compare builds)."""
    key = (binary, flag)
    if key not in _FLAGS:
        out = subprocess.run([binary, "node", "--help"], capture_output=True, text=True)
        _FLAGS[key] = flag in out.stdout
    return _FLAGS[key]


class ShoalNode:
    def __init__(self, binary, root, ns, ip, p2p_ip, peers=(), trust=(), listen_port=5000,
                 p2p_port=4001, log_level="info", transport="quic"):
        self.root = root
        self.ns = ns
        os.makedirs(os.path.join(root, "data"), exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        env.update(XDG_CONFIG_HOME=root, XDG_DATA_HOME=root, SHOAL_LOG=log_level)
        cmd = [binary, "node", "--data-dir", os.path.join(root, "data"),
               "--listen", f"{ip}:{listen_port}", "--no-mdns",
               "--p2p-listen", p2p_addr(p2p_ip, p2p_port, transport)]
        # Each node serves its puller over the benchmark's private namespace address: an open
        # registry beyond loopback, which a node refuses without --insecure. A node older than
        # access control does not know the flag.
        if supports_flag(binary, "--insecure"):
            cmd.append("--insecure")
        for p in peers:
            cmd += ["--peer", p]
        for k in trust:
            cmd += ["--trust", f"{k}=*"]
        self.proc = Proc(cmd, os.path.join(root, "shoal.log"), ns=ns, env=env,
                         stdout_lines=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        self.url = self.peer_id = self.key = None
        while self.url is None:
            for line in list(self.proc.lines):
                if line.startswith(PEER_PREFIX):
                    self.peer_id = line[len(PEER_PREFIX):].split()[0]
                elif line.startswith(KEY_PREFIX):
                    self.key = line[len(KEY_PREFIX):].strip()
                elif line.startswith(READY_PREFIX):
                    self.url = "http://" + line[len(READY_PREFIX):].strip().rstrip("/")
            if self.url is None:
                if not self.proc.alive() or time.monotonic() > deadline:
                    self.proc.stop()
                    raise RuntimeError(f"shoal in {ns or 'root'} did not become ready; "
                                       f"see {root}/shoal.log")
                time.sleep(0.05)
        if not (self.peer_id and self.key):
            raise RuntimeError(f"shoal in {ns}: no peer id / key on stdout: {self.proc.lines}")

    @property
    def pid(self):
        return self.proc.pid

    def get(self, path, timeout=10):
        return curl_get(self.ns, f"{self.url}{path}", timeout)

    def status(self):
        return json.loads(self.get("/_shoal/v1/status"))

    def stop(self):
        self.proc.stop()


def curl_get(ns, url, timeout=10):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + [
        "curl", "-sS", "--fail", "-m", str(timeout), url]
    return sh(cmd, timeout=timeout + 10).stdout


def has_tag(ns, base):
    try:
        tags = json.loads(curl_get(ns, f"{base}/v2/{REPO}/tags/list", 5)).get("tags") or []
    except (RuntimeError, ValueError, subprocess.TimeoutExpired):
        return False
    return TAG in tags


def wait_for_tags(nodes, timeout):
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending:
        pending = [n for n in pending if not has_tag(n.ns, n.url)]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} node(s) never listed {REPO}:{TAG}: "
                               f"{[n.ns for n in pending]}")
        time.sleep(0.5)


class Registry:
    """Debian's docker-registry (Distribution 2.8) inside a namespace."""

    def __init__(self, root, ns, ip):
        self.ns = ns
        data = os.path.join(root, "data")
        os.makedirs(data, exist_ok=True)
        self.url = f"http://{ip}:5000"
        config = write_distribution_config(root, data, f"{ip}:5000")
        self.proc = Proc(["docker-registry", "serve", config], os.path.join(root, "registry.log"),
                         ns=ns)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                curl_get(ns, f"{self.url}/v2/", 2)
                break
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            if not self.proc.alive() or time.monotonic() > deadline:
                self.proc.stop()
                raise RuntimeError(f"docker-registry did not start; see {root}/registry.log")
            time.sleep(0.1)

    def stop(self):
        self.proc.stop()


def push(ns, image_dir, base):
    host = base[len("http://"):]
    start = time.monotonic()
    sh((["ip", "netns", "exec", ns] if ns else []) +
       ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{image_dir}:latest",
        f"docker://{host}/{REPO}:{TAG}"], timeout=1800)
    return time.monotonic() - start


def pull_cmd(client, ns, base, out_dir, blobs, repo=REPO):
    host = base[len("http://"):]
    pre = ["ip", "netns", "exec", ns]
    if client == "skopeo":
        return pre + ["skopeo", "copy", "--src-tls-verify=false",
                      f"docker://{host}/{repo}:{TAG}", f"oci:{out_dir}:latest"]
    # curl: manifest, then every blob (config and layers), one after another, to /dev/null.
    urls = [f"{base}/v2/{repo}/manifests/{TAG}"] + [f"{base}/v2/{repo}/blobs/{d}" for d in blobs]
    cmd = pre + ["curl", "-sS", "--fail", "-H",
                 "Accept: application/vnd.oci.image.manifest.v1+json"]
    if len(blobs) > 3:
        # A multi-layer image: three downloads at a time, as docker pulls layers.
        cmd += ["--parallel", "--parallel-max", "3"]
    for u in urls:
        cmd += ["-o", "/dev/null", u]
    return cmd


ANSI = re.compile(r"\x1b\[[0-9;]*m")
TIMELINE_PHASES = ["manifest", "blob asked", "peers found", "index", "first chunk", "last chunk",
                   "stored", "client done"]


def node_timeline(log_path, wall0, client_s):
    """Where one puller's time went, in seconds from the pull's start, read from its node's
    log: the manifest fetched; then, for the largest blob, the fetch's start, its candidates
    found, its index, its first and last chunk written, the blob stored (digest checked); and
    the client done. Missing phases (a node that held the blob already) are None."""
    t = dict.fromkeys(TIMELINE_PHASES)
    t["client done"] = client_s
    size = -1
    try:
        with open(log_path, errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return t
    for line in lines:
        line = ANSI.sub("", line)
        parts = line.split(None, 1)
        if len(parts) < 2 or "fetched" not in line:
            continue
        try:
            at = datetime.datetime.fromisoformat(parts[0].replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
        if at < wall0:
            continue
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        if ": fetched manifest " in line and t["manifest"] is None:
            t["manifest"] = at - wall0
        elif ": fetched blob " in line and int(fields.get("size", -1)) > size:
            size = int(fields["size"])
            begun = at - int(fields["elapsed_ms"]) / 1000
            ms = lambda k: (begun - wall0 + int(fields[k]) / 1000  # noqa: E731
                            if fields.get(k, "").isdigit() else None)
            t.update({"blob asked": begun - wall0, "peers found": ms("lookup_ms"),
                      "index": ms("index_ms"), "first chunk": ms("first_chunk_ms"),
                      "last chunk": ms("last_chunk_ms"), "stored": at - wall0})
    return t


def stop_perf(perf):
    """Stops a `perf record` started for a measurement (it writes its file on SIGINT)."""
    perf.send_signal(signal.SIGINT)
    try:
        perf.wait(timeout=300)
    except subprocess.TimeoutExpired:
        perf.kill()
        perf.wait()


def simultaneous_pulls(client, pullers, tmp, blobs, sampler=None, repo=REPO, marks=None):
    """pullers: list of (ns, base url). Starts all at once; returns (all_done, per-node times).
    `marks`, if given, gets the wall-clock time of the start ("wall0")."""
    barrier = threading.Barrier(len(pullers) + 1)
    times = [None] * len(pullers)
    errors = []

    def one(k, ns, base):
        out = os.path.join(tmp, f"pull-{k}")
        cmd = pull_cmd(client, ns, base, out, blobs, repo)
        barrier.wait()
        t0 = time.monotonic()
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=7200)
        times[k] = time.monotonic() - t0
        if proc.returncode != 0:
            errors.append(f"{ns}: exit {proc.returncode}: {proc.stderr[-2000:]}")
        shutil.rmtree(out, ignore_errors=True)

    threads = [threading.Thread(target=one, args=(k, ns, base), daemon=True)
               for k, (ns, base) in enumerate(pullers)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.monotonic()
    if marks is not None:
        marks["wall0"] = time.time()
    stop = threading.Event()
    samp = None
    if sampler:
        samp = threading.Thread(target=sampler, args=(start, stop), daemon=True)
        samp.start()
    for t in threads:
        t.join()
    all_done = time.monotonic() - start
    stop.set()
    if samp:
        samp.join(timeout=30)
    if errors:
        raise RuntimeError("pull failed:\n" + "\n".join(errors))
    return all_done, times


def run_shoal(args, topo, n, image_dir, image_bytes, blobs, tmp):
    log(f"shoal, {n} pullers: starting {n + 1} nodes")
    nodes = []
    res = {}
    try:
        root = os.path.join(tmp, f"shoal-{n}")
        origin = ShoalNode(args.shoal_bin, os.path.join(root, "n0"), topo.ns[0], addr(0), addr(0),
                           transport=args.transport)
        nodes.append(origin)
        boot = peer_arg(p2p_addrs(addr(0), 4001, args.transport), origin.peer_id)
        for i in range(1, n + 1):
            nodes.append(ShoalNode(args.shoal_bin, os.path.join(root, f"n{i}"), topo.ns[i],
                                   addr(i), addr(i), peers=[boot], trust=[origin.key],
                                   transport=args.transport))
        res["push_s"] = push(topo.ns[0], image_dir, origin.url)
        log(f"shoal, {n} pullers: pushed to n0 in {res['push_s']:.1f}s; waiting for the tag")
        t0 = time.monotonic()
        wait_for_tags(nodes[1:], timeout=120)
        res["tag_spread_s"] = time.monotonic() - t0
        peers = [len(json.loads(nd.get("/_shoal/v1/peers")).get("peers", [])) for nd in nodes]
        res["peers_per_node"] = peers
        log(f"shoal, {n} pullers: tag everywhere after {res['tag_spread_s']:.1f}s; "
            f"peers per node {peers}; pulling")
        served0 = origin.status()["served_bytes"]
        tx0 = topo.tx_bytes(0)
        cpu0 = [cpu_seconds(nd.pid) for nd in nodes]
        samples = []
        perf = None
        if args.perf_pull:
            # A flat profile of every node's process while the fleet pulls (the largest fleet's
            # overwrites the others').
            perf = subprocess.Popen(["perf", "record", "-q", "-F", "499", "-o", args.perf_pull,
                                     "-p", ",".join(str(nd.pid) for nd in nodes)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)

        def sampler(start, stop):
            while not stop.wait(args.sample_s):
                row = {"t": round(time.monotonic() - start, 1)}
                try:
                    row["served"] = [nd.status()["served_bytes"] for nd in nodes]
                    row["tx0"] = topo.tx_bytes(0)
                except Exception as e:  # noqa: BLE001 -- sampling is best effort
                    row["error"] = str(e)[:200]
                samples.append(row)

        marks = {}
        try:
            all_done, times = simultaneous_pulls(
                args.client, [(nd.ns, nd.url) for nd in nodes[1:]], root, blobs, sampler,
                marks=marks)
        finally:
            if perf:
                stop_perf(perf)
        wall0 = marks["wall0"]
        res["all_done_s"] = all_done
        res["per_node_s"] = times
        res["cpu_s"] = [cpu_seconds(nd.pid) - c for nd, c in zip(nodes, cpu0)]
        res["timeline"] = [node_timeline(os.path.join(nd.root, "shoal.log"), wall0, t)
                           for nd, t in zip(nodes[1:], times)]
        res["served0"] = origin.status()["served_bytes"] - served0
        res["tx0"] = topo.tx_bytes(0) - tx0
        res["served_all"] = [nd.status()["served_bytes"] for nd in nodes]
        res["rss"] = [peak_rss_bytes(nd.pid) for nd in nodes]
        res["samples"] = samples
        res["bad_peers"] = [nd.status().get("bad_peers") for nd in nodes]
        log(f"shoal, {n} pullers: all done in {all_done:.1f}s (per node min "
            f"{min(times):.1f} median {statistics.median(times):.1f}); origin served "
            f"{res['served0'] / image_bytes:.2f}x image, eth0 tx {res['tx0'] / image_bytes:.2f}x; "
            f"max RSS {max(r or 0 for r in res['rss']) / MIB:.0f} MiB")
        log(f"  shoal CPU during the pull: {sum(res['cpu_s']):.0f} CPU-s in total, "
            f"{sum(res['cpu_s']) / (n * image_bytes / 1e9):.1f} CPU-s per GB delivered; per node "
            f"{[round(c, 1) for c in res['cpu_s']]}")
        log(f"  served_bytes per node (MiB): "
            f"{[round(s / MIB) for s in res['served_all']]}")
        return res
    finally:
        for nd in nodes:
            nd.stop()
        if not args.keep:
            for i in range(len(nodes)):
                shutil.rmtree(os.path.join(tmp, f"shoal-{n}", f"n{i}", "data"),
                              ignore_errors=True)


MIRROR_UPSTREAM = "upstream.test"


def run_mirror(args, topo, n, image_dir, image_bytes, blobs, tmp):
    """Pull-through: docker-registry in n0 is the upstream (nothing else runs there); n1..nN run
    Shoal with it as `[[upstream]]` (bootstrapped to n1) and pull `upstream.test/<repo>` from
    their own node at once. Upstream egress = n0's eth0 tx bytes."""
    reg = None
    nodes = []
    res = {}
    root = os.path.join(tmp, f"mirror-{n}")
    try:
        reg = Registry(os.path.join(root, "upstream"), topo.ns[0], addr(0))
        res["push_s"] = push(topo.ns[0], image_dir, reg.url)
        log(f"mirror, {n} pullers: image in the upstream ({res['push_s']:.1f}s); starting {n} nodes")
        boot = []
        for i in range(1, n + 1):
            node_root = os.path.join(root, f"n{i}")
            os.makedirs(os.path.join(node_root, "shoal"), exist_ok=True)
            with open(os.path.join(node_root, "shoal", "config.toml"), "w") as f:
                f.write(f'[[upstream]]\nname = "{MIRROR_UPSTREAM}"\nurl = "{reg.url}"\n'
                        f'insecure = true\n')
            nd = ShoalNode(args.shoal_bin, node_root, topo.ns[i], addr(i), addr(i), peers=boot,
                           transport=args.transport)
            nodes.append(nd)
            if not boot:
                boot = [peer_arg(p2p_addrs(addr(i), 4001, args.transport), nd.peer_id)]
        deadline = time.monotonic() + 60
        while True:
            peers = [len(json.loads(nd.get("/_shoal/v1/peers")).get("peers", [])) for nd in nodes]
            if min(peers) >= n - 1 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        res["peers_per_node"] = peers
        log(f"mirror, {n} pullers: peers per node {peers}; pulling")
        tx0 = topo.tx_bytes(0)
        cpu0 = [cpu_seconds(nd.pid) for nd in nodes]
        all_done, times = simultaneous_pulls(
            args.client, [(nd.ns, nd.url) for nd in nodes], root, blobs,
            repo=f"{MIRROR_UPSTREAM}/{REPO}")
        res["all_done_s"] = all_done
        res["per_node_s"] = times
        res["tx0"] = topo.tx_bytes(0) - tx0
        res["cpu_s"] = [cpu_seconds(nd.pid) - c for nd, c in zip(nodes, cpu0)]
        res["served_all"] = [nd.status()["served_bytes"] for nd in nodes]
        log(f"mirror, {n} pullers: all done in {all_done:.1f}s (per node min {min(times):.1f} "
            f"median {statistics.median(times):.1f}); upstream eth0 tx "
            f"{res['tx0'] / image_bytes:.2f}x image; served_bytes per node (MiB) "
            f"{[round(x / MIB) for x in res['served_all']]}")
        return res
    finally:
        for nd in nodes:
            nd.stop()
        if reg:
            reg.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def run_registry(args, topo, n, image_dir, image_bytes, blobs, tmp, label):
    reg = None
    res = {}
    try:
        root = os.path.join(tmp, f"registry-{label}")
        reg = Registry(root, topo.ns[0], addr(0))
        res["push_s"] = push(topo.ns[0], image_dir, reg.url)
        log(f"registry, {n} puller(s): pushed in {res['push_s']:.1f}s; pulling")
        tx0 = topo.tx_bytes(0)
        cpu0 = cpu_seconds(reg.proc.pid)
        # Pullers reach the registry on node 0's address, across their shaped links.
        pullers = [(topo.ns[i], reg.url) for i in range(1, n + 1)]
        all_done, times = simultaneous_pulls(args.client, pullers, root, blobs)
        res["all_done_s"] = all_done
        res["per_node_s"] = times
        res["tx0"] = topo.tx_bytes(0) - tx0
        res["cpu_s"] = cpu_seconds(reg.proc.pid) - cpu0
        log(f"registry, {n} puller(s): all done in {all_done:.1f}s (min {min(times):.1f}); "
            f"origin eth0 tx {res['tx0'] / image_bytes:.2f}x image")
        return res
    finally:
        if reg:
            reg.stop()
        if not args.keep:
            shutil.rmtree(os.path.join(tmp, f"registry-{label}", "data"), ignore_errors=True)


STREAM_MARKS = (0.25, 0.5, 0.75)


def stream_with_marks(url, size, timeout_s=1800):
    """GETs `url` and reads the body as it arrives, into one reused buffer: the harness shares
    the machine with the nodes it measures, and a client that allocates per read (fresh pages
    each time, on a VM) or pipes the body through another process took a fifth of its CPU.
    Returns (bytes received, wall seconds, {share of the bytes: share of the wall time it took})."""
    parts = urllib.parse.urlsplit(url)
    start = time.monotonic()
    # The socket timeout bounds a body that stops coming; the deadline bounds the whole pull.
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    got, at = 0, {}
    try:
        conn.request("GET", parts.path)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"GET {url}: {resp.status} {resp.read(2000)!r}")
        buf = memoryview(bytearray(1 << 20))
        while True:
            n = resp.readinto(buf)
            if not n:
                break
            got += n
            for q in STREAM_MARKS:
                if q not in at and got >= q * size:
                    at[q] = time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"GET {url}: not done after {timeout_s} s")
    finally:
        conn.close()
    wall = time.monotonic() - start
    return got, wall, {q: t / wall for q, t in at.items()}


def run_loopback(args, image_dir, big_digest, big_size, tmp):
    log("loopback: two shoal nodes on 127.0.0.1")
    a = b = None
    try:
        root = os.path.join(tmp, "loopback")
        a = ShoalNode(args.shoal_bin, os.path.join(root, "a"), None, "127.0.0.1", "127.0.0.1",
                      listen_port=0, p2p_port=0, transport=args.transport)
        listen = a.status()["p2p_listen"]
        # One loopback address of each transport `p2p_addrs` gives, by its protocol part.
        kinds = [x.split("/")[3] for x in p2p_addrs("127.0.0.1", 0, args.transport)]
        mine = [x for k in kinds for x in listen if f"/{k}/" in x and "127.0.0.1" in x]
        if len(mine) != len(kinds):
            raise RuntimeError(f"loopback: node a has no loopback {args.transport} address: "
                               f"{listen}")
        boot = peer_arg(mine, a.peer_id)
        b = ShoalNode(args.shoal_bin, os.path.join(root, "b"), None, "127.0.0.1", "127.0.0.1",
                      peers=[boot], trust=[a.key], listen_port=0, p2p_port=0,
                      transport=args.transport)
        push(None, image_dir, a.url)
        wait_for_tags([b], timeout=120)
        url = f"{b.url}/v2/{REPO}/blobs/{big_digest}"
        cpu0 = (cpu_seconds(a.pid), cpu_seconds(b.pid))
        perf = None
        if args.perf:
            # A flat profile of both nodes while the blob crosses: where the CPU per byte goes.
            perf = subprocess.Popen(["perf", "record", "-q", "-F", "999", "-o", args.perf,
                                     "-p", f"{a.pid},{b.pid}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        # The body is counted as it arrives: how steadily a client streaming a download gets it.
        try:
            got, wall, marks = stream_with_marks(url, big_size)
        finally:
            if perf:
                stop_perf(perf)
        cpu = (cpu_seconds(a.pid) - cpu0[0], cpu_seconds(b.pid) - cpu0[1])
        if got != big_size:
            raise RuntimeError(f"loopback: got {got} bytes, expected {big_size}")
        # Reference: the same blob served by a node that has it on disk.
        start = time.monotonic()
        sh(["curl", "-sS", "--fail", "-o", "/dev/null", f"{a.url}/v2/{REPO}/blobs/{big_digest}"],
           timeout=1800)
        local = time.monotonic() - start
        res = {"wall_s": wall, "mbps": big_size / wall / MB, "local_mbps": big_size / local / MB,
               "stream_marks": marks, "cpu_s": cpu,
               "cpu_s_per_gb": sum(cpu) / (big_size / 1e9),
               "rss_a": peak_rss_bytes(a.pid), "rss_b": peak_rss_bytes(b.pid),
               "served_a": a.status()["served_bytes"]}
        log(f"loopback: {big_size / MB:.0f} MB via peer in {wall:.2f}s = {res['mbps']:.0f} MB/s "
            f"(from local disk {res['local_mbps']:.0f} MB/s); the client had "
            + ", ".join(f"{q:.0%} at {marks[q]:.2f}" for q in STREAM_MARKS if q in marks)
            + f" of the time; CPU {cpu[0]:.2f} s sender + {cpu[1]:.2f} s receiver = "
            f"{res['cpu_s_per_gb']:.2f} CPU-s per GB")
        return res
    finally:
        for nd in (a, b):
            if nd:
                nd.stop()


def fmt_s(x):
    return f"{x:.1f}" if x is not None else "–"


def main():
    p = argparse.ArgumentParser(description="Shoal swarm rollout benchmark (needs root)")
    p.add_argument("--shoal-bin", required=True)
    p.add_argument("--nodes", default="8,16", help="puller counts, comma separated (8,16)")
    p.add_argument("--image-mib", type=float, default=512, help="random layer size (512)")
    p.add_argument("--layers", type=int, default=1,
                   help="cut the random bytes into this many layers (1); curl then fetches "
                        "three blobs at a time, as docker does")
    p.add_argument("--mbit", type=float, default=100, help="per-link rate, both ways (100)")
    p.add_argument("--burst", default="256kb")
    p.add_argument("--latency", default="50ms")
    p.add_argument("--client", choices=["skopeo", "curl"], default="skopeo")
    p.add_argument("--transport", choices=["quic", "tcp", "both"], default="both",
                   help="node-to-node transport: QUIC, TCP (TLS or noise, yamux), or both as "
                        "a node listens by default (both)")
    p.add_argument("--prefix", default=f"swb{os.getpid() % 100000}",
                   help="namespace name prefix (the shell wrapper passes a unique one)")
    p.add_argument("--skip-registry", action="store_true", help="no docker-registry baseline")
    p.add_argument("--origin", choices=["shoal", "upstream"], default="shoal",
                   help="shoal: a Shoal node publishes the image; upstream: docker-registry "
                        "in n0 is an upstream that every puller's node mirrors (pull-through)")
    p.add_argument("--skip-loopback", action="store_true")
    p.add_argument("--loopback-only", action="store_true",
                   help="only the loopback measurement (no namespaces)")
    p.add_argument("--perf", metavar="FILE",
                   help="record a flat `perf` profile of both loopback nodes into FILE")
    p.add_argument("--perf-pull", metavar="FILE",
                   help="record a flat `perf` profile of every node while the largest fleet "
                        "pulls, into FILE (slows the pull: profile runs are not timing runs)")
    p.add_argument("--sample-s", type=float, default=2.0, help="progress sampling period")
    p.add_argument("--json", help="also write all raw numbers here")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the temp dir's logs only (data and images removed)")
    args = p.parse_args()
    counts = sorted({int(x) for x in args.nodes.split(",") if x.strip()})
    if not counts or min(counts) < 1 or max(counts) > 250:
        p.error("--nodes: between 1 and 250")
    if os.geteuid() != 0:
        sys.exit("swarm-bench: needs root (ip netns, tc)")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    tmp = tempfile.mkdtemp(prefix="shoal-swarm-bench-")
    topo = None
    results = {"args": vars(args), "shoal": {}, "registry": {}}
    ok = False
    try:
        log(f"building a {args.image_mib:g} MiB image in {tmp}")
        image_dir = os.path.join(tmp, "image")
        summary = json.loads(sh([sys.executable, os.path.join(SCRIPTS, "make-oci-image.py"),
                                 image_dir, "--random-mib", str(args.image_mib),
                                 "--random-layers", str(args.layers), "--seed", "1"],
                                timeout=1800).stdout)
        with open(os.path.join(image_dir, "index.json")) as f:
            mdigest = json.load(f)["manifests"][0]["digest"]
        with open(os.path.join(image_dir, "blobs", *mdigest.split(":"))) as f:
            manifest = json.load(f)
        blob_list = [manifest["config"]] + manifest["layers"]
        blobs = [b["digest"] for b in blob_list]
        image_bytes = sum(b["size"] for b in blob_list) + os.path.getsize(
            os.path.join(image_dir, "blobs", *mdigest.split(":")))
        big = max(manifest["layers"], key=lambda b: b["size"])
        results["image"] = {"bytes": image_bytes, "manifest": mdigest, "summary": summary}
        ideal = image_bytes * 8 / (args.mbit * 1e6)
        results["ideal_computed_s"] = ideal
        log(f"image {image_bytes / MB:.1f} MB; computed ideal at {args.mbit:g} Mbit/s: "
            f"{ideal:.1f}s")

        if not args.skip_loopback:
            results["loopback"] = run_loopback(args, image_dir, big["digest"], big["size"], tmp)

        if args.loopback_only:
            counts = []
            args.skip_registry = True
        log(f"topology: {max(counts, default=0) + 1} namespaces '{args.prefix}n*', bridge in "
            f"'{args.prefix}hub', tbf {args.mbit:g}mbit burst {args.burst} latency {args.latency}")
        if counts:
            topo = Topology(args.prefix, max(counts) + 1, args.mbit, args.burst, args.latency)

        run = run_mirror if args.origin == "upstream" else run_shoal
        for n in counts:
            results["shoal"][n] = run(args, topo, n, image_dir, image_bytes, blobs, tmp)
        if not args.skip_registry:
            results["registry"]["single"] = run_registry(args, topo, 1, image_dir, image_bytes,
                                                         blobs, tmp, "single")
            for n in counts:
                results["registry"][n] = run_registry(args, topo, n, image_dir, image_bytes,
                                                      blobs, tmp, str(n))
        ok = True
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2, default=str)
        if topo:
            topo.destroy()
        if args.keep or args.keep_logs or not ok:
            log(f"kept {tmp} (logs: */shoal.log, */registry.log)")
            if not args.keep:
                # Keep only the logs on failure, not gigabytes of data.
                for dp, dns, _ in os.walk(tmp):
                    for d in list(dns):
                        if d in ("data", "image") or d.startswith("pull-"):
                            shutil.rmtree(os.path.join(dp, d), ignore_errors=True)
                            dns.remove(d)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- report ----
    single = results["registry"].get("single", {}).get("all_done_s")
    image_mb = image_bytes / MB
    print(f"## Shoal swarm rollout, {args.mbit:g} Mbit/s per link (tbf both ways)\n")
    print(f"- image: {image_mb:.1f} MB (busybox layer + {args.image_mib:g} MiB random "
          f"{'layer' if args.layers == 1 else f'bytes in {args.layers} layers'}, "
          f"manifest {mdigest[:19]}…)")
    print(f"- client: `{args.client}` on every puller, against its own node (Shoal) or node 0 "
          f"(registry); all pullers start at once; time = until the last one is done; "
          f"node-to-node transport: {args.transport}")
    print(f"- ideal (b): {image_mb:.1f} MB / {args.mbit:g} Mbit/s = {ideal:.1f} s computed"
          + (f"; one puller alone from docker-registry: {single:.1f} s" if single else ""))
    print(f"- machine: {os.cpu_count()} cores; shoal {sh([args.shoal_bin, '--version'], check=False).stdout.strip()}\n")
    print("| pullers | Shoal all-done (s) | registry all-done (s) | ideal computed / measured (s) "
          "| Shoal / ideal | origin egress ÷ image, Shoal served_bytes / eth0 tx "
          "| origin egress ÷ image, registry eth0 tx | max peak RSS per Shoal node (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in counts:
        s = results["shoal"][n]
        r = results["registry"].get(n, {})
        rss = max((x or 0 for x in s.get("rss", [])), default=0) / MIB
        ratio = s["all_done_s"] / ideal
        ratio_m = f" ({s['all_done_s'] / single:.2f}× measured)" if single else ""
        reg_egress = f"{r['tx0'] / image_bytes:.2f}" if r else "–"
        print(f"| {n} | {s['all_done_s']:.1f} | {fmt_s(r.get('all_done_s'))} | {ideal:.1f} / "
              f"{fmt_s(single)} | {ratio:.2f}×{ratio_m} | {s.get('served0', 0) / image_bytes:.2f} / "
              f"{s['tx0'] / image_bytes:.2f} | {reg_egress} | {rss:.0f} |")
    lb = results.get("loopback")
    if lb:
        print(f"\nLoopback node-to-node (unshaped, 127.0.0.1, {args.transport.upper()}): {big['size'] / MB:.0f} MB blob "
              f"in {lb['wall_s']:.2f} s = **{lb['mbps']:.0f} MB/s** (same blob from the node's "
              f"own disk: {lb['local_mbps']:.0f} MB/s); streamed to the client as it arrived: "
              + ", ".join(f"{q:.0%} of the bytes at {t:.2f}"
                          for q, t in sorted(lb["stream_marks"].items()))
              + " of the pull's time"
              + f"; CPU {lb['cpu_s_per_gb']:.2f} CPU-s per GB (sender and receiver)")
    print("\nPer-node pull times (s), Shoal: " + "; ".join(
        f"{n} pullers: min {min(results['shoal'][n]['per_node_s']):.1f}, median "
        f"{statistics.median(results['shoal'][n]['per_node_s']):.1f}, max "
        f"{max(results['shoal'][n]['per_node_s']):.1f}" for n in counts))
    print("\nShoal CPU during the pull (all nodes, CPU-s per GB delivered to pullers): " + "; ".join(
        f"{n} pullers: {sum(results['shoal'][n]['cpu_s']):.0f} CPU-s, "
        f"{sum(results['shoal'][n]['cpu_s']) / (n * image_bytes / 1e9):.1f} CPU-s/GB"
        for n in counts))
    for n in counts:
        tl = results["shoal"][n].get("timeline") or []
        if not tl:
            continue
        slowest = max(tl, key=lambda t: t["client done"] or 0)
        print(f"\nWhere each puller's time went, {n} pullers (seconds from the pull's start, the "
              f"largest blob's fetch; × ideal in brackets): median over pullers / slowest puller")
        print("| " + " | ".join(TIMELINE_PHASES) + " |")
        print("|" + "---:|" * len(TIMELINE_PHASES))

        def cell(v):
            return "–" if v is None else f"{v:.2f} ({v / ideal:.2f}×)"
        med = []
        for ph in TIMELINE_PHASES:
            vals = [t[ph] for t in tl if t[ph] is not None]
            med.append(cell(statistics.median(vals) if vals else None))
        print("| " + " | ".join(med) + " |")
        print("| " + " | ".join(cell(slowest[ph]) for ph in TIMELINE_PHASES) + " |")
    print("\nTargets: Shoal all-done ≤ 1.5× ideal at 16 nodes; origin egress ≤ 2× image; "
          "loopback ≥ 500 MB/s; peak RSS ≤ 256 MB.")


if __name__ == "__main__":
    main()
