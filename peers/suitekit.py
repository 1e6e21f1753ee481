"""What every peer-suite harness needs to get a project's own tests: a
command run and shown, a venv made once for a set of packages, and the
project's source (its ``tests/``) from the sdist on the package index.

The rule: a harness asks for the source of exactly the version that is
installed, and keeps it (and the venv) until that version changes; nothing
is fetched twice.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (shown first), raising if it fails."""
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, **kwargs)  # type: ignore[call-overload]


def stamped_venv(venv: Path, packages: list[str], stamp_text: str) -> Path:
    """``venv`` with geventctx from this checkout (editable) and ``packages``,
    made once: a stamp holding ``stamp_text`` marks it done."""
    stamp = venv / ".installed"
    if stamp.exists() and stamp.read_text() == stamp_text:
        return venv
    if venv.exists():
        shutil.rmtree(venv)
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-e", str(ROOT), *packages])
    stamp.write_text(stamp_text)
    return venv


def sdist_source(python: str, requirement: str, cache: Path, source: Path, name: str) -> Path:
    """``source``: the unpacked sdist of ``requirement`` (``pip download
    --no-binary :all:`` with ``python``, into ``cache``), moved there once."""
    cache.mkdir(parents=True, exist_ok=True)
    download = cache / f"download-{source.name}"
    run([python, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", str(download),
         requirement])
    archives = sorted(download.glob("*"))
    if not archives:
        raise SystemExit(f"no {name} source archive was downloaded into {download}")
    unpacked = cache / "unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    if archives[0].suffix == ".zip":
        shutil.unpack_archive(str(archives[0]), str(unpacked))
        found = next(path for path in unpacked.iterdir() if path.is_dir())
    else:
        with tarfile.open(archives[0]) as tar:
            top = tar.getnames()[0].split("/")[0]
            tar.extractall(unpacked, filter="data")
        found = unpacked / top
    if source.exists():
        shutil.rmtree(source)
    found.rename(source)
    return source
