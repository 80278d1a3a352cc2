"""A read-only copy of a model directory, and a snapshot to prove nothing was written to it.

`chmod a-w` stops every user but root; as root (this machine, many CI containers) the copy is
also bind-mounted read-only when the process may mount, so a write fails with EROFS as it
would on a device whose model volume is read-only. The snapshot (names, sizes, mtimes) is
checked either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from onnx_export.manifest import Manifest, Segment


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    """Every file under `d` with its size and modification time."""
    return {
        str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(d.rglob("*"))
    }


def _writable(d: Path) -> bool:
    probe = d / ".write-probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return False
    probe.unlink()
    return True


def _mount_readonly(src: Path, dst: Path) -> bool:
    """Bind `src` on `dst` read-only; False when this process may not mount."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    ok = subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True)
    if ok.returncode:
        return False
    ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], capture_output=True)
    if ro.returncode:
        subprocess.run(["umount", str(dst)], check=True)
        return False
    return True


@contextlib.contextmanager
def readonly_model(
    manifest: Manifest, keep: Callable[[Segment], bool], workdir: Path
) -> Iterator[Path]:
    """A model directory holding the segments `keep` selects (its manifest lists only them),
    the shared data files they map, the tokenizer files, read-only for the duration of the
    context."""
    src, view = workdir / "files", workdir / "model"
    src.mkdir(parents=True)
    view.mkdir()
    kept = [s for s in manifest.segments if keep(s)]
    for s in kept:
        shutil.copyfile(manifest.path(s), src / s.file)
    data = {f for s in kept for f in s.data}
    for f in [*manifest.tokenizer.values(), *data]:
        shutil.copyfile(manifest.directory / f, src / f)
    copy = dataclasses.replace(
        manifest,
        segments=kept,
        directory=src,
        data_files={f: h for f, h in manifest.data_files.items() if f in data},
    )
    copy.write()
    for p in src.iterdir():
        p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    src.chmod(
        stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    )
    mounted = _mount_readonly(src, view)
    root = view if mounted else src
    if os.geteuid() != 0 or mounted:  # else only the snapshot can tell
        assert not _writable(root), f"{root} is still writable"
    try:
        yield root
    finally:
        if mounted:
            subprocess.run(["umount", str(view)], check=True)
        src.chmod(stat.S_IRWXU)
        for p in src.iterdir():
            p.chmod(stat.S_IRUSR | stat.S_IWUSR)
