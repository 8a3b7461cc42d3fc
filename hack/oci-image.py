#!/usr/bin/env python3
"""Builds an OCI image archive from a Containerfile, with no daemon and no registry.

    hack/oci-image.py --file node-agent/Containerfile --context DIR --tag REF --out OUT.tar

`docker build` or `buildah` build the same Containerfiles. This exists because the test node has
no registry and no image builder: it understands the part of the Containerfile language our
images use (`FROM scratch`, `COPY`, `USER`, `ENTRYPOINT`, `CMD`, `ENV`, `WORKDIR`, `LABEL`) and
rejects anything else with the line it could not build. All files go into one layer with
zeroed times and owners, so the same inputs give the same image digest. Import the archive with
`ctr -n k8s.io images import OUT.tar`.
"""
import argparse
import hashlib
import io
import json
import os
import shlex
import sys
import tarfile


def fail(msg):
    print(f"oci-image: {msg}", file=sys.stderr)
    sys.exit(1)


def parse(path):
    """Yields (line number, instruction, argument text), joining continued lines."""
    with open(path) as f:
        lines = f.read().splitlines()
    buf, start = "", 0
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        yield start, word.upper(), rest.strip()
        buf = ""


def exec_form(text, where):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        fail(f"{where}: use the exec form, a JSON list of strings")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        fail(f"{where}: use the exec form, a JSON list of strings")
    return value


def key_values(text, where):
    pairs = {}
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"{where}: expected KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


class Layer:
    def __init__(self):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)
        self.dirs = set()

    def _info(self, name, mode):
        info = tarfile.TarInfo(name)
        info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = mode, 0, 0, 0, "", ""
        return info

    def parents(self, name):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.dirs:
                self.dirs.add(d)
                info = self._info(d, 0o755)
                info.type = tarfile.DIRTYPE
                self.tar.addfile(info)

    def add(self, src, dest, mode=None):
        """Adds a file, symlink or directory tree (sorted, so the layer is reproducible)."""
        name = dest.lstrip("/")
        if os.path.islink(src):
            self.parents(name)
            info = self._info(name, 0o777)
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(src)
            self.tar.addfile(info)
        elif os.path.isdir(src):
            if name and name not in self.dirs:
                self.parents(name + "/x")
            for entry in sorted(os.listdir(src)):
                self.add(os.path.join(src, entry), f"{name}/{entry}" if name else entry, mode)
        elif os.path.isfile(src):
            self.parents(name)
            info = self._info(name, mode if mode is not None else os.stat(src).st_mode & 0o7777)
            info.size = os.path.getsize(src)
            with open(src, "rb") as f:
                self.tar.addfile(info, f)
        else:
            fail(f"{src}: not found")

    def bytes(self):
        self.tar.close()
        return self.buf.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", required=True, help="the Containerfile")
    ap.add_argument("--context", required=True, help="build context directory (COPY sources are relative to it)")
    ap.add_argument("--tag", required=True, help="image reference, e.g. localhost/runwarden/runwarden-agent:dev")
    ap.add_argument("--out", required=True, help="OCI archive to write")
    args = ap.parse_args()

    config = {"Env": [], "Labels": {}}
    layer = Layer()
    seen_from = False
    for n, word, rest in parse(args.file):
        where = f"{args.file}:{n}"
        if word == "FROM":
            if rest.split()[0] != "scratch" or seen_from:
                fail(f"{where}: only a single `FROM scratch` stage is supported here (build it with docker or buildah)")
            seen_from = True
            continue
        if not seen_from:
            fail(f"{where}: {word} before FROM")
        if word == "COPY":
            items = shlex.split(rest)
            mode = None
            while items and items[0].startswith("--"):
                flag = items.pop(0)
                if flag.startswith("--chmod="):
                    mode = int(flag.split("=", 1)[1], 8)
                else:
                    fail(f"{where}: COPY flag {flag} is not supported")
            if len(items) < 2:
                fail(f"{where}: COPY needs a source and a destination")
            *sources, dest = items
            for src in sources:
                path = os.path.normpath(os.path.join(args.context, src))
                target = dest
                if (dest.endswith("/") or len(sources) > 1) and not os.path.isdir(path):
                    target = dest.rstrip("/") + "/" + os.path.basename(src)
                layer.add(path, target, mode)
        elif word == "USER":
            config["User"] = rest
        elif word == "ENTRYPOINT":
            config["Entrypoint"] = exec_form(rest, where)
        elif word == "CMD":
            config["Cmd"] = exec_form(rest, where)
        elif word == "WORKDIR":
            config["WorkingDir"] = rest
        elif word == "ENV":
            config["Env"] += [f"{k}={v}" for k, v in key_values(rest, where).items()]
        elif word == "LABEL":
            config["Labels"].update(key_values(rest, where))
        else:
            fail(f"{where}: {word} is not supported here (build it with docker or buildah)")
    if not seen_from:
        fail(f"{args.file}: no FROM")

    blobs = {}

    def blob(data):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    layer_bytes = layer.bytes()
    layer_desc = blob(layer_bytes)
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": f"hack/oci-image.py {os.path.basename(args.file)}"}],
    }
    config_desc = blob(json.dumps(image_config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer_desc}],
    }
    manifest_desc = blob(json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            **manifest_desc,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": args.tag, "org.opencontainers.image.ref.name": args.tag.rsplit(":", 1)[-1]},
        }],
    }

    tmp = args.out + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as out:
        def put(name, data):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            out.addfile(info, io.BytesIO(data))
        put("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        put("index.json", json.dumps(index, sort_keys=True).encode())
        for digest in sorted(blobs):
            put("blobs/sha256/" + digest.split(":", 1)[1], blobs[digest])
    os.replace(tmp, args.out)
    print(f"{args.tag} {manifest_desc['digest']} ({len(layer_bytes) // 1024} KiB) -> {args.out}")


if __name__ == "__main__":
    main()
