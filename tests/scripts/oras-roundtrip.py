#!/usr/bin/env python3
"""Push and pull an artifact and a referrer with the PyPI `oras` client.

Usage: oras-roundtrip.py HOST:PORT REPO WORKDIR

1. pushes WORKDIR/artifact.txt as an artifact to HOST:PORT/REPO:artifact
   (one layer, empty config);
2. pushes WORKDIR/signature.txt to HOST:PORT/REPO:referrer with `subject`
   pointing at the artifact's manifest (an OCI 1.1 referrer);
3. pulls both back into fresh directories and checks the bytes;
4. prints one JSON line on stdout: the digests and sizes of both manifests,
   for the caller to check the referrers API.

Exits non-zero (with a message on stderr) on any mismatch. The registry is
spoken to over plain HTTP (`insecure=True`).
"""

import hashlib
import json
import os
import sys

import oras.client
import oras.oci
import requests

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SIGNATURE_CONFIG = "application/vnd.shoal.test.signature.v1+json"


def fail(msg):
    print(f"oras-roundtrip: {msg}", file=sys.stderr)
    sys.exit(1)


def raw_manifest(host, repo, ref):
    resp = requests.get(f"http://{host}/v2/{repo}/manifests/{ref}",
                        headers={"Accept": OCI_MANIFEST}, timeout=30)
    if resp.status_code != 200:
        fail(f"GET manifest {repo}:{ref}: HTTP {resp.status_code}: {resp.text[:500]}")
    body = resp.content
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    header = resp.headers.get("Docker-Content-Digest")
    if header is not None and header != digest:
        fail(f"GET manifest {repo}:{ref}: Docker-Content-Digest {header} != body digest {digest}")
    return body, digest


def pull_and_check(client, target, outdir, name, expected):
    os.makedirs(outdir)
    files = client.pull(target=target, outdir=outdir)
    paths = [f for f in files if os.path.basename(f) == name]
    if len(paths) != 1:
        fail(f"pull {target}: expected one file {name}, got {files}")
    with open(paths[0], "rb") as f:
        got = f.read()
    if got != expected:
        fail(f"pull {target}: {name} differs ({len(got)} bytes, expected {len(expected)})")


def main():
    if len(sys.argv) != 4:
        fail("usage: oras-roundtrip.py HOST:PORT REPO WORKDIR")
    host, repo, work = sys.argv[1:]
    os.chdir(work)
    artifact = os.urandom(100_000) + b"shoal artifact\n"
    signature = b"signature over the artifact, not a real one\n"
    with open("artifact.txt", "wb") as f:
        f.write(artifact)
    with open("signature.txt", "wb") as f:
        f.write(signature)
    with open("sig-config.json", "wb") as f:
        f.write(b"{}")

    client = oras.client.OrasClient(hostname=host, insecure=True)
    target = f"{host}/{repo}:artifact"
    resp = client.push(target=target, files=["artifact.txt"], quiet=True)
    if resp.status_code != 201:
        fail(f"push {target}: HTTP {resp.status_code}")
    artifact_body, artifact_digest = raw_manifest(host, repo, "artifact")

    subject = oras.oci.Subject(mediaType=OCI_MANIFEST, digest=artifact_digest,
                               size=len(artifact_body))
    ref_target = f"{host}/{repo}:referrer"
    resp = client.push(target=ref_target, files=["signature.txt"], subject=subject,
                       manifest_config=f"sig-config.json:{SIGNATURE_CONFIG}", quiet=True)
    if resp.status_code != 201:
        fail(f"push {ref_target}: HTTP {resp.status_code}")
    referrer_body, referrer_digest = raw_manifest(host, repo, "referrer")
    if json.loads(referrer_body).get("subject", {}).get("digest") != artifact_digest:
        fail("referrer manifest lost its subject")

    pull_and_check(client, target, "pulled-artifact", "artifact.txt", artifact)
    pull_and_check(client, ref_target, "pulled-referrer", "signature.txt", signature)
    # Pull by digest too: a registry must serve a manifest under its digest.
    pull_and_check(client, f"{host}/{repo}@{artifact_digest}", "pulled-by-digest",
                   "artifact.txt", artifact)

    print(json.dumps({
        "artifact": {"digest": artifact_digest, "size": len(artifact_body)},
        "referrer": {"digest": referrer_digest, "size": len(referrer_body),
                     "artifactType": SIGNATURE_CONFIG,
                     "oci_subject_header": resp.headers.get("OCI-Subject")},
    }))


if __name__ == "__main__":
    main()
