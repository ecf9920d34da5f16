"""Generate the Python code for protos/ in place: the one way generated code is produced.

    python scripts/generate_protos.py           # regenerate
    python scripts/generate_protos.py --check   # exit 1 when the committed code is stale

Each ``protos/inventory/v1/X.proto`` yields ``X_pb2.py``, ``X_pb2.pyi`` (typed, by
mypy-protobuf) and ``X_pb2_grpc.py`` beside it, importable as ``inventory.v1.X_pb2``.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from google.rpc import status_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = PROTO_ROOT / "inventory" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PACKAGE_DIR.glob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    # google/rpc/status.proto ships with googleapis-common-protos (a grpcio-status dependency).
    googleapis = str(Path(status_pb2.__file__).resolve().parent.parent.parent)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"-I{googleapis}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(directory: Path) -> list[Path]:
    return sorted(
        p.relative_to(directory)
        for p in (directory / "inventory" / "v1").iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        (out / "inventory" / "v1").mkdir(parents=True)
        generate(out)
        fresh = generated_files(out)
        if options.check:
            committed = generated_files(PROTO_ROOT)
            stale = [str(p) for p in fresh if not (PROTO_ROOT / p).exists()]
            stale += [str(p) for p in committed if p not in fresh]
            stale += [
                str(p)
                for p in fresh
                if (PROTO_ROOT / p).exists() and not filecmp.cmp(out / p, PROTO_ROOT / p, False)
            ]
            if stale:
                print("generated code is stale; run scripts/generate_protos.py:", *stale)
                return 1
            print(f"generated code is fresh ({len(fresh)} files)")
            return 0
        for p in generated_files(PROTO_ROOT):
            (PROTO_ROOT / p).unlink()
        for p in fresh:
            shutil.copyfile(out / p, PROTO_ROOT / p)
        print(f"generated {len(fresh)} files into {PACKAGE_DIR.relative_to(ROOT)}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
