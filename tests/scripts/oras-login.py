#!/usr/bin/env python3
"""Log in with the PyPI `oras` client and push and pull an artifact over HTTPS.

Usage: oras-login.py HOST:PORT REPO WORKDIR USER PASSWORD CA_FILE

Logs in as USER with PASSWORD (the distribution token flow: the client answers the node's
`Bearer` challenge at its token endpoint), pushes WORKDIR/artifact.txt to HOST:PORT/REPO:1 and
pulls it back, trusting only CA_FILE. Exits non-zero with a message on stderr on any failure.
"""

import os
import sys

import oras.client


def fail(msg):
    print(f"oras-login: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    if len(sys.argv) != 7:
        fail("usage: oras-login.py HOST:PORT REPO WORKDIR USER PASSWORD CA_FILE")
    host, repo, work, user, password, ca = sys.argv[1:]
    os.chdir(work)
    artifact = os.urandom(50_000) + b"shoal artifact over https\n"
    with open("artifact.txt", "wb") as f:
        f.write(artifact)
    client = oras.client.OrasClient(hostname=host, tls_verify=ca)
    client.login(username=user, password=password, hostname=host, tls_verify=True,
                 config_path=os.path.join(work, "oras-auth.json"))
    target = f"{host}/{repo}:1"
    resp = client.push(target=target, files=["artifact.txt"], quiet=True)
    if resp.status_code != 201:
        fail(f"push {target}: HTTP {resp.status_code}")
    os.makedirs("pulled")
    files = client.pull(target=target, outdir="pulled")
    got = [f for f in files if os.path.basename(f) == "artifact.txt"]
    if len(got) != 1:
        fail(f"pull {target}: expected artifact.txt, got {files}")
    with open(got[0], "rb") as f:
        if f.read() != artifact:
            fail(f"pull {target}: the bytes differ")
    print("ok")


if __name__ == "__main__":
    main()
