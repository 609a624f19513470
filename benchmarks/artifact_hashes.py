"""artifact_hashes: the SHA-256 of every file export writes, for every built-in under the
``lossless``, ``int8`` and ``int8-dynamic`` recipes (onnxruntime CPU) and the int8 models that
the ``hls`` backend takes, so a restructuring can show that it left the artifacts byte-identical.

Hashes depend on the machine (calibration and verification run in onnxruntime), so compare two
commits on one machine, from the same checkout path (torch's exporter records the source files'
paths in model.onnx's node metadata). The quantizer's speed guard writes measured latencies into
the manifest and report (``speed guard: int8/fp32 latency 0.62x``; a warning where int8 was not
faster, kernels in order of time): those notes are masked whole, and so is the manifest's hash of
report.md, which holds them; everything else is compared byte for byte.

    git worktree add /tmp/check <before> && cd /tmp/check
    PYTHONPATH=. python benchmarks/artifact_hashes.py --out /tmp/before.json
    git checkout <after>
    PYTHONPATH=. python benchmarks/artifact_hashes.py --out /tmp/after.json --compare /tmp/before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
from pathlib import Path

import slimgraph
from slimgraph.frontend.builtin import BUILTINS

RECIPES = ("lossless", "int8", "int8-dynamic")
HLS_MODELS = ("digits-cnn", "mlp")  # the int8 built-ins the hls backend lowers
TIMED = re.compile(r"[^\n\"]*(speed guard|guard: the \d+ float layer)[^\n\"]*"  # measured latencies
                   r"|\"report\.md\": \"[0-9a-f]{64}\"")


def _digest(path: Path) -> str:
    data = path.read_bytes()
    if path.name in ("manifest.json", "report.md"):
        text = TIMED.sub("<measured>", data.decode())
        data = text.encode()
    return hashlib.sha256(data).hexdigest()


def cases() -> list[tuple[str, str, str]]:
    rows = [(model, recipe, "ort-cpu") for model in BUILTINS for recipe in RECIPES]
    return rows + [(model, "int8", "hls") for model in HLS_MODELS]


def hashes(model: str, recipe: str, backend: str, root: Path) -> dict[str, str]:
    out = root / f"{model}-{recipe}-{backend}"
    slimgraph.export(model, out, passes=recipe, backends=[backend], allow_mismatch=True)
    return {p.relative_to(out).as_posix(): _digest(p) for p in sorted(out.rglob("*")) if p.is_file()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, help="an earlier --out: list every file that differs")
    parser.add_argument("--models", help="comma-separated subset of the built-ins")
    args = parser.parse_args()
    wanted = set(args.models.split(",")) if args.models else None
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model, recipe, backend in cases():
            if wanted is None or model in wanted:
                key = f"{model} {recipe} {backend}"
                results[key] = hashes(model, recipe, backend, Path(tmp))
                print(key, len(results[key]), "files", flush=True)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())
    differ = [f"{case}: {name}" for case in sorted(set(before) | set(results))
              for name in sorted(set(before.get(case, {})) | set(results.get(case, {})))
              if before.get(case, {}).get(name) != results.get(case, {}).get(name)]
    print("\n".join(differ) or f"all {sum(map(len, results.values()))} files byte-identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
