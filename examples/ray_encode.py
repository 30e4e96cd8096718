"""Sharded extraction from Python with Ray Data: the shards layout `mmbridge encode --manifest ... --format
clip-retrieval` writes, driven by Ray Data's map_batches over the mmbridge Python package.

    pip install "ray[data]"          # not a dependency of mmbridge: this is an example
    python3 examples/ray_encode.py MODEL --manifest images.txt -o out/ --shard-size 1000 --pool mean \
        --actors 4 --threads 2 [--resume]

Each Ray actor opens the model once (mmbridge.Model, `threads` workers each) and encodes whole shards: one row of the
dataset is one shard index. The split is the CLI's (docs/decisions.md "Sharded extraction"): shard k holds the
manifest's inputs [k * shard_size, (k + 1) * shard_size). Each shard writes

    img_emb/img_emb_{k}.npy            float32 [rows, width] (--pool none: [rows, tokens, width])
    metadata/metadata_{k}.jsonl        one line a row: {"image_path", "manifest_index", "tokens"}
    shard-{k:06d}.json                 the sidecar, written last: a shard is finished when it and its files exist

each through a temporary file and os.replace, so a killed actor leaves no partial shard; --resume skips finished
ones. Undecodable images go to the sidecar's "errors" (and errors.jsonl) instead of stopping the job. index.json is
written by the driver at the end. The manifest is a list of paths (one a line), JSON lines ({"path": ...}) or a
webdataset .tar (members grouped by key, as webdataset does; read with Python's tarfile).

The C driver (`mpirun -np N mmbridge encode --mpi`) writes the same files; mixing the two on one directory works when
the settings (shard size, pool, format) agree. Python's mean is numpy's float32 mean over tokens (pairwise), so its
rows may differ from the CLI's (summed in double) in the last bits.
"""
import argparse
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp"}


def read_manifest(path):
    """[(name, loader)] where loader() returns the image's bytes, in manifest order."""
    path = Path(path)
    if path.suffix == ".tar":
        return tar_inputs(path)
    base = path.parent
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            rec = json.loads(line)
            if "path" not in rec:
                raise ValueError(f"{path}: only local paths are read (download URLs first, e.g. with img2dataset)")
            line = rec["path"]
        p = Path(line) if os.path.isabs(line) else base / line
        out += tar_inputs(p, line) if p.suffix == ".tar" else [(line, lambda p=p: p.read_bytes())]
    return out


def tar_inputs(p, label=None):
    label = label or str(p)
    out, seen = [], set()
    with tarfile.open(p) as t:
        for m in t:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            key = m.name[:len(m.name) - len(base)] + base.split(".", 1)[0]
            ext = base.split(".", 1)[1].lower()
            if ext in IMAGE_EXTS and key not in seen:
                seen.add(key)
                out.append((f"{label}#{m.name}", lambda p=p, off=m.offset_data, n=m.size: read_at(p, off, n)))
    return out


def read_at(p, off, n):
    with open(p, "rb") as f:
        f.seek(off)
        return f.read(n)


def write_atomic(path, data: bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finished(out, k):
    side = Path(out) / f"shard-{k:06d}.json"
    if not side.exists():
        return False
    return all((Path(out) / f).exists() for f in json.loads(side.read_text())["files"])


class EncodeShards:
    """A Ray actor: one mmbridge.Model, whole shards per call."""

    def __init__(self, args, n_inputs):
        import mmbridge
        self.args, self.n = args, n_inputs
        self.inputs = read_manifest(args.manifest)
        self.model = mmbridge.Model(args.model, threads=args.threads)

    def __call__(self, batch):
        done = []
        for k in batch["shard"]:
            self.encode_shard(int(k))
            done.append(int(k))
        return {"shard": np.array(done)}

    def encode_shard(self, k):
        a = self.args
        lo, hi = k * a.shard_size, min((k + 1) * a.shard_size, self.n)
        rows, meta, errors = [], [], []
        for i in range(lo, hi):
            name, load = self.inputs[i]
            try:
                emb = self.model.encode([load()])
                emb = emb[0] if isinstance(emb, list) else emb[0]
            except Exception as e:  # mmbridge.Error: an undecodable image
                errors.append({"input": name, "index": i, "message": str(e)})
                continue
            rows.append(emb.mean(0) if a.pool == "mean" else emb[0] if a.pool == "cls" else emb)
            meta.append({"image_path": name, "manifest_index": i, "tokens": int(emb.shape[0])})
        arr = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
        buf = io.BytesIO()
        np.lib.format.write_array(buf, arr, version=(1, 0))
        out = Path(a.output)
        files = [f"img_emb/img_emb_{k}.npy", f"metadata/metadata_{k}.jsonl"]
        write_atomic(out / files[0], buf.getvalue())
        write_atomic(out / files[1], "".join(json.dumps(m) + "\n" for m in meta).encode())
        side = {"shard": k, "format": "clip-retrieval", "pool": a.pool, "shard_size": a.shard_size,
                "n_inputs": self.n, "first": lo, "end": hi, "rows": len(rows), "files": files,
                "inputs": [{"name": m["image_path"], "index": m["manifest_index"], "tokens": m["tokens"]} for m in meta],
                "errors": errors}
        write_atomic(out / f"shard-{k:06d}.json", json.dumps(side, indent=1).encode())  # last: the shard is done


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--manifest", required=True)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--pool", choices=["none", "mean", "cls"], default="mean")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="mmbridge worker threads per actor")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()

    import ray

    n = len(read_manifest(args.manifest))
    n_shards = (n + args.shard_size - 1) // args.shard_size
    todo = [k for k in range(n_shards) if not (args.resume and finished(args.output, k))]
    print(f"{n} inputs, {n_shards} shards of {args.shard_size}; {len(todo)} to do")
    ray.init()
    ds = ray.data.from_items([{"shard": k} for k in todo])
    # one shard per call; each actor keeps its model between calls
    done = ds.map_batches(EncodeShards, fn_constructor_args=(args, n), batch_size=1, concurrency=args.actors,
                          num_cpus=args.threads)
    print(f"encoded {sum(1 for _ in done.iter_rows())} shard(s)")
    shards = [json.loads((Path(args.output) / f"shard-{k:06d}.json").read_text())
              for k in range(n_shards) if finished(args.output, k)]
    index = {"n_inputs": n, "shard_size": args.shard_size, "n_shards": n_shards, "finished": len(shards),
             "complete": len(shards) == n_shards, "rows": sum(s["rows"] for s in shards), "format": "clip-retrieval",
             "pool": args.pool, "manifest": args.manifest,
             "shards": [{"shard": s["shard"], "sidecar": f"shard-{s['shard']:06d}.json", "files": s["files"],
                         "first": s["first"], "end": s["end"], "rows": s["rows"], "errors": len(s["errors"])}
                        for s in shards]}
    write_atomic(Path(args.output) / "errors.jsonl",
                 "".join(json.dumps(e) + "\n" for s in shards for e in s["errors"]).encode())
    write_atomic(Path(args.output) / "index.json", json.dumps(index, indent=1).encode())


if __name__ == "__main__":
    main()
