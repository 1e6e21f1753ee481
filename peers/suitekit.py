"""What every peer-suite harness needs to get a project's own tests and run
them: a command run and shown, a venv made once for a set of packages, the
project's source (its ``tests/``) from the sdist on the package index, a
pytest run with a plugin of ours and a JUnit report, and what the report
says (each test's outcome, the plain run's baseline).

The rule: a harness asks for the source of exactly the version that is
installed, and keeps it (and the venv) until that version changes; nothing
is fetched twice.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
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


def run_pytest(
    venv: Path, cwd: Path, plugin: str, report: Path, targets: list[str], env: dict[str, str], timeout: float
) -> tuple[str, float]:
    """pytest in ``venv`` on ``targets`` with ``plugin`` (from ``peers/``) and
    the settings in ``env`` (shown), writing ``report``; (its output, seconds).
    geventctx's own plugin is off: the suite judges its project's promises."""
    full = dict(os.environ)
    full["PYTHONPATH"] = str(ROOT / "peers")
    full.pop("GEVENTCTX_PATCH", None)
    full.update(env)
    cmd = [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:geventctx",
           "-p", plugin, "-o", "addopts=", f"--junitxml={report}", *targets]
    start = time.monotonic()
    print("+", " ".join(cmd), f"({', '.join(f'{k}={v}' for k, v in env.items())})", flush=True)
    done = subprocess.run(cmd, cwd=cwd, env=full, text=True, capture_output=True, timeout=timeout)
    tail = [line for line in done.stdout.splitlines() if line.strip()][-3:]
    print("\n".join("    " + line for line in tail), flush=True)
    if not report.exists():
        print(done.stdout[-4000:], done.stderr[-4000:])
        raise SystemExit("the tests did not write their report")
    return done.stdout, time.monotonic() - start


def outcomes(report: Path) -> dict[str, str]:
    """test id -> passed / failed / error / skipped."""
    result: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "failed" if child.tag == "failure" else child.tag
                if child.tag == "error" and outcome != "failed":
                    outcome = "error"
        result[name] = outcome
    return result


def detail(report: Path, name: str) -> str:
    """The first line of test ``name``'s failure message in ``report``."""
    for case in ET.parse(report).getroot().iter("testcase"):
        if f"{case.get('classname')}::{case.get('name')}" == name:
            for child in case:
                if child.tag in ("failure", "error"):
                    return (child.get("message") or "").splitlines()[0][:200] if child.get("message") else ""
    return ""


def baseline(plain: dict[str, str], report: Path) -> list[str] | None:
    """The plain run's failures, one line each (not counted), or ``None`` if
    it did not even collect (an error at collection, or nothing passed):
    then nothing can be judged."""
    broken = [name for name, outcome in plain.items() if outcome == "error" and name.startswith("::")]
    if broken or not any(outcome == "passed" for outcome in plain.values()):
        return None
    return [
        f"  baseline failure (not counted): {name}: {detail(report, name)}"
        for name in sorted(n for n, o in plain.items() if o in ("failed", "error"))
    ]
