"""Generate client/pb from proto/ (the one command; `make proto`). `--check` fails if stale.

The .proto keeps its package path (proto/titan/fusion/v1/fusion.proto, package titan.fusion.v1);
protoc's virtual include path maps it to titan_fusion/client/pb so that the generated modules import
each other under the installed, namespaced name.
"""
from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto" / "titan" / "fusion" / "v1"
VIRTUAL = "titan_fusion/client/pb"
OUT_DIR = ROOT / "client" / "pb"
GENERATED = ("fusion_pb2.py", "fusion_pb2.pyi", "fusion_pb2_grpc.py")


def generate(into: Path) -> None:
    args = [
        "protoc",
        f"-I{VIRTUAL}={PROTO_DIR}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={into}",
        f"--pyi_out={into}",
        f"--grpc_python_out={into}",
        f"{VIRTUAL}/fusion.proto",
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if client/pb is stale")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        produced = Path(tmp) / VIRTUAL
        if opts.check:
            stale = [n for n in GENERATED
                     if not (OUT_DIR / n).exists()
                     or not filecmp.cmp(produced / n, OUT_DIR / n, shallow=False)]
            if stale:
                print(f"stale generated code in client/pb: {', '.join(stale)}; run `make proto`",
                      file=sys.stderr)
                return 1
            print("client/pb is up to date")
            return 0
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        for n in GENERATED:
            (OUT_DIR / n).write_bytes((produced / n).read_bytes())
        print(f"generated {', '.join(GENERATED)} in {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
