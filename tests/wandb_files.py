"""Read back what W&B wrote offline for a run directory: the records of each runs/<run>/wandb/
offline-run-*/run-<id>.wandb file (W&B's LevelDB-style log of protobuf `Record`s) and the tables
under its files/media/table/.

    python tests/wandb_files.py runs/smollm2_sharegpt     # prints a digest of every offline run
"""

import glob
import json
import os
import sys

BLOCK, HEADER = 32768, 7  # the log's block size; a chunk's header: crc32 (4), length (2, LE), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str):
    """The protobuf Records of one .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path}: not a W&B log (header {data[:7]!r})"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        pending += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            pending = b""
            yield rec


def digest(run_dir: str) -> dict:
    """{"runs": [{"file", "id", "config", "history": [{key: value}], "summary": {key: value},
    "tables": {key: {"columns", "data"}}}]} of every offline run under run_dir/wandb."""
    out = []
    for f in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        run = {"file": os.path.relpath(f, run_dir), "id": None, "config": {}, "history": [], "summary": {},
               "tables": {}}
        for rec in records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run["id"] = rec.run.run_id
                run["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
            elif kind == "history":
                run["history"].append({_key(i): json.loads(i.value_json) for i in rec.history.item})
            elif kind == "summary":
                run["summary"].update({_key(i): json.loads(i.value_json) for i in rec.summary.update})
        media = os.path.join(os.path.dirname(f), "files")
        for row in run["history"]:  # a logged table is a history entry {name}/_type = "table-file"
            for key, value in row.items():
                if key.endswith("/_type") and value == "table-file":
                    with open(os.path.join(media, row[key[:-len("/_type")] + "/path"])) as t:
                        run["tables"][key[:-len("/_type")]] = json.load(t)
        out.append(run)
    return {"runs": out}


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


if __name__ == "__main__":
    for r in digest(sys.argv[1])["runs"]:
        print(f"{r['file']}: run id {r['id']}, config keys {sorted(r['config'])[:8]}, {len(r['history'])} history "
              f"rows")
        keys = sorted({k for row in r["history"] for k in row if not k.startswith("_") and "/_" not in k
                       and not k.endswith(("path", "/sha256", "/size", "/ncols", "/nrows", "/log_mode"))})
        print("  history keys:", ", ".join(keys))
        print("  summary:", json.dumps({k: v for k, v in r["summary"].items() if k in keys or k.count("/") >= 2})[:600])
        for name, t in r["tables"].items():
            print(f"  table {name}: columns {t['columns']}, {len(t['data'])} rows; first: "
                  f"{json.dumps(t['data'][0])[:200] if t['data'] else '-'}")
