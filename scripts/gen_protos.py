"""Regenerate the Python code for protos/ into clients/python/subsidy_client/v1/.

Runs grpc_tools.protoc with --python_out, --grpc_python_out and mypy-protobuf's typed stubs
(--mypy_out, --mypy_grpc_out), rewrites the absolute `subsidy.v1` imports into package imports,
and writes an __init__.py. With --check it generates into a temporary folder and fails when the
checked-in code differs, so CI catches a proto change without regenerated code.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "subsidy" / "v1"
OUTPUT_DIR = ROOT / "clients" / "python" / "subsidy_client" / "v1"
IMPORT_PATTERN = re.compile(r"^from subsidy\.v1 import", re.MULTILINE)
MYPY_PROGRESS = re.compile(r"^Writing mypy to \S+$")
GRPC_TOOLS_INCLUDE = Path(grpc_tools.__file__).parent / "_proto"
# mypy-protobuf's plugins are installed beside the interpreter; the venv need not be activated.
BIN_DIR = Path(sys.executable).parent


def protoc_messages(output: str) -> str:
    """What protoc printed, without mypy-protobuf's "Writing mypy to ..." line per file (18 lines
    of progress in every run, --check included); warnings and errors stay."""
    return "\n".join(line for line in output.splitlines() if not MYPY_PROGRESS.match(line)).strip()


def generate(output_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as raw:
        raw_dir = Path(raw)
        protos = sorted(str(path) for path in PROTO_DIR.glob("*.proto"))
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{GRPC_TOOLS_INCLUDE}",
            f"--plugin=protoc-gen-mypy={BIN_DIR / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={BIN_DIR / 'protoc-gen-mypy_grpc'}",
            f"--python_out={raw_dir}",
            f"--grpc_python_out={raw_dir}",
            f"--mypy_out={raw_dir}",
            f"--mypy_grpc_out={raw_dir}",
            *protos,
        ]
        completed = subprocess.run(command, capture_output=True, text=True)
        messages = protoc_messages(completed.stdout + completed.stderr)
        if messages:
            print(messages, file=sys.stderr)
        if completed.returncode != 0:
            raise SystemExit(f"protoc failed (exit status {completed.returncode})")
        output_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted((raw_dir / "subsidy" / "v1").iterdir()):
            text = IMPORT_PATTERN.sub("from subsidy_client.v1 import", path.read_text())
            (output_dir / path.name).write_text(text)
        modules = sorted(path.stem for path in output_dir.glob("*_pb2*.py"))
        lines = ['"""Generated from protos/subsidy/v1 by scripts/gen_protos.py. Do not edit."""', ""]
        lines += [f"from subsidy_client.v1 import {name} as {name}" for name in modules]
        (output_dir / "__init__.py").write_text("\n".join(lines) + "\n")


def differences(left: Path, right: Path) -> list[str]:
    comparison = filecmp.dircmp(left, right, ignore=["__pycache__"])
    changed = comparison.left_only + comparison.right_only + comparison.diff_files
    # dircmp compares shallowly by stat signature; compare contents to be exact.
    for name in comparison.common_files:
        if (left / name).read_bytes() != (right / name).read_bytes() and name not in changed:
            changed.append(name)
    return sorted(changed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if checked-in code is stale")
    arguments = parser.parse_args()
    if not arguments.check:
        shutil.rmtree(OUTPUT_DIR, ignore_errors=True)
        generate(OUTPUT_DIR)
        print(f"generated {OUTPUT_DIR.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as fresh:
        generate(Path(fresh))
        changed = differences(Path(fresh), OUTPUT_DIR)
    if changed:
        print("generated code is stale; run `make gen-protos`. Differs: " + ", ".join(changed))
        return 1
    print("generated code is fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
