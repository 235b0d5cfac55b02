"""Write the markdown (and a copy of the record) of one `pytest benchmarks/` results file.

    python benchmarks/_render.py RESULTS.json OUT_DIR [--name NAME]

For a run whose .json came back without its .md (a lent GPU returns few files), or to file a
second run of one machine beside the first (--name cuda-nvidia-h200-compile). Runs are never
merged: only figures timed in the same run's interleaved rounds compare.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _records  # noqa: E402
import _summary  # noqa: E402

RECORDS = ("kernels", "training", "training_overhead", "calls", "targets", "parity_notes")


def collector_of(data):
    col = _records.Collector()
    for r in data.get("kernels", []):
        col.kernels[(r["device"], r["dtype"], r["shape"], r["gran"], r["layout"], r["impl"], r["pass"])] = r
    for r in data.get("training", []):
        col.training[(r["device"], r["net"], r["variant"])] = r
    for r in data.get("training_overhead", []):
        col.overheads[(r["device"], r["net"], r["variant"], r.get("compiled", False))] = r
    for r in data.get("calls", []):
        col.calls[(r["device"], r["impl"], r["pass"])] = r
    for n in data.get("parity_notes", []):
        col.notes[(n["impl"], n["topic"])] = [tuple(x) for x in n["seen"]]
    return col


def render(path: Path, out_dir: Path, name: str | None = None):
    data = json.loads(path.read_text())
    col = collector_of(data)
    devices = _records.devices_of(col)
    if len(devices) != 1:
        raise SystemExit(f"_render: expected the results of one device in {path}, got {devices}")
    env = {k: v for k, v in data.items() if k not in RECORDS}
    if name:
        env["machine"] = name
    return _summary.write_results(col, {devices[0]: env}, out_dir)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--name", help="machine name of the files written (default: the run's)")
    args = ap.parse_args()
    for path in render(args.results, args.out_dir, args.name):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
