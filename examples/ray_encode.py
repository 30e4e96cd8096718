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
webdataset .tar, read by the library's own reader (mmbridge.Manifest), as the CLI reads it.

The C driver (`mpirun -np N mmbridge encode --mpi`) writes the same files; mixing the two on one directory works when
the settings (shard size, pool, format) agree. The rows are the library's pooling of one image a forward: equal bit
for bit to `mmbridge encode --manifest ... --format clip-retrieval --batch 1` at the same threads
(tests/python/test_manifest.py runs encode_shard without Ray and compares).
"""
import argparse
import io
import json
import os
from pathlib import Path

import numpy as np


def read_manifest(path):
    """The manifest through the library's reader (mmbridge.Manifest: the CLI's, so the names and the order agree)."""
    import mmbridge
    return mmbridge.Manifest(path)


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
        self.mmbridge = mmbridge
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
        a, mmb = self.args, self.mmbridge
        rows, meta, errors = [], [], []
        for i in mmb.shard_range(self.n, a.shard_size, k):
            inp = self.inputs[i]
            try:
                emb = self.model.encode([self.inputs.read(i)])   # one image a forward, as the CLI's --batch 1
                if isinstance(emb, list):                         # images of their own token counts (Qwen2-VL)
                    emb = emb[0][None]
            except mmb.Error as e:                                # an undecodable image, a URL
                errors.append({"input": inp.name, "index": i, "message": str(e)})
                continue
            rows.append(mmb.pool_tokens(emb, a.pool)[0])          # the library's pooling: the CLI's rows
            meta.append({"image_path": inp.name, "manifest_index": i, "tokens": int(emb.shape[1])})
        w = self.model.info.out_width  # an empty shard keeps the CLI's shape: [0, width] or [0, 0, width]
        arr = np.stack(rows).astype(np.float32) if rows else np.zeros((0, w) if a.pool != "none" else (0, 0, w),
                                                                      np.float32)
        buf = io.BytesIO()
        np.lib.format.write_array(buf, arr, version=(1, 0))
        out = Path(a.output)
        files = [f"img_emb/img_emb_{k}.npy", f"metadata/metadata_{k}.jsonl"]
        write_atomic(out / files[0], buf.getvalue())
        # compact JSON lines, as the CLI writes them (cJSON_PrintUnformatted)
        write_atomic(out / files[1], "".join(json.dumps(m, separators=(",", ":"), ensure_ascii=False) + "\n"
                                             for m in meta).encode())
        r = mmb.shard_range(self.n, a.shard_size, k)
        side = {"shard": k, "format": "clip-retrieval", "pool": a.pool, "shard_size": a.shard_size,
                "n_inputs": self.n, "first": r.start, "end": r.stop, "rows": len(rows), "files": files,
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

    import mmbridge
    n = len(read_manifest(args.manifest))
    n_shards = mmbridge.shard_count(n, args.shard_size)
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
