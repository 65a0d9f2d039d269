"""Debian data packages for the ``debian`` source: find or download the ``.deb``, unpack it into a cache.

Nothing is installed system-wide: ``apt-get download`` only fetches the ``.deb`` file (into
the cache, or it is taken from a ``debs`` folder), ``dpkg-deb -x`` unpacks it under
``<cache>/unpacked/<package>_<version>/``. An unpacked tree is complete only once its
``.complete`` marker exists (it records the ``.deb`` file, size, mtime and SHA-256), so a
killed unpack is redone and a finished one is reused without hashing the ``.deb`` again.

A package that cannot be had (no such package, no network, a corrupt ``.deb``) raises
:class:`PackageUnavailable` with a one-line reason; the caller skips it and goes on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from marsctl.data.paths import safe_id
from marsctl.files import sha256_file, write_json_atomic

MARKER = ".complete"


class PackageUnavailable(Exception):
    """A package could not be downloaded, read or unpacked; ``str(exc)`` is the one-line reason."""


@dataclass(frozen=True)
class PackageInfo:
    name: str
    version: str
    deb: Path
    sha256: str
    root: Path  # the unpacked tree

    def copyright_file(self) -> Path | None:
        path = self.root / "usr/share/doc" / self.name / "copyright"
        return path if path.is_file() else None

    def to_dict(self) -> dict:
        return {"package": self.name, "version": self.version, "deb": self.deb.name, "sha256": self.sha256}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "marsctl" / "debian"


def download_command(package: str) -> list[str]:
    """The command that fetches ``package``'s ``.deb`` into the working directory (no install)."""
    return ["apt-get", "download", package]


def _run(args: list[str], cwd: Path | None = None) -> str:
    """Run a command; its failure becomes :class:`PackageUnavailable` naming the command and its last line."""
    try:
        done = subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise PackageUnavailable(f"{args[0]}: command not found (the debian source needs Debian's apt-get and dpkg-deb)") from None
    except subprocess.CalledProcessError as exc:
        lines = [line for line in (exc.stderr or exc.stdout or "").strip().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(("E:", "dpkg-deb: error", "dpkg-deb:"))] or lines
        raise PackageUnavailable(f"{' '.join(args[:2])} failed (exit {exc.returncode}): {(errors or ['no output'])[-1].strip()}") from None
    return done.stdout


def find_deb(package: str, folders: list[Path]) -> Path | None:
    """The ``<package>_<version>_<arch>.deb`` in the first folder that has one (the last by name if several)."""
    for folder in folders:
        found = sorted(folder.glob(f"{package}_*.deb")) if folder.is_dir() else []
        if found:
            return found[-1]
    return None


def deb_fields(deb: Path) -> dict[str, str]:
    """``Package`` and ``Version`` from the ``.deb``'s control file (also a first integrity check)."""
    out = _run(["dpkg-deb", "--field", str(deb), "Package", "Version"])
    fields = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if value:
            fields[key.strip()] = value.strip()
    if "Package" not in fields or "Version" not in fields:
        raise PackageUnavailable(f"{deb}: no Package/Version in its control file")
    return fields


def obtain_package(package: str, cache: Path, debs: Path | None = None, download: bool = True) -> PackageInfo:
    """The unpacked package: its ``.deb`` from ``debs`` or the cache, else ``apt-get download`` into the cache."""
    cache.mkdir(parents=True, exist_ok=True)
    folders = [d for d in (debs, cache) if d is not None]
    deb = find_deb(package, folders)
    if deb is None:
        if not download:
            where = " or ".join(str(f) for f in folders)
            raise PackageUnavailable(f"no {package}_*.deb in {where} (and download is off)")
        with tempfile.TemporaryDirectory(prefix=f".{package}-", dir=cache) as staging:
            _run(download_command(package), cwd=Path(staging))
            got = find_deb(package, [Path(staging)])
            if got is None:
                raise PackageUnavailable(f"apt-get download {package} wrote no .deb")
            deb = cache / got.name
            os.replace(got, deb)
    stat = deb.stat()
    fields = deb_fields(deb)
    if fields["Package"] != package:
        raise PackageUnavailable(f"{deb}: holds package {fields['Package']!r}, not {package!r}")
    version = fields["Version"]
    root = cache / "unpacked" / safe_id(f"{package}_{version}")
    identity = {"deb": str(deb.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    marker = root / MARKER
    try:
        saved = json.loads(marker.read_text(encoding="utf-8"))
        if {k: saved.get(k) for k in identity} == identity and saved.get("sha256"):
            return PackageInfo(package, version, deb, saved["sha256"], root)
    except (OSError, ValueError):
        pass
    digest = sha256_file(deb)
    staging = Path(tempfile.mkdtemp(prefix=f".{package}-unpack-", dir=cache))
    try:
        _run(["dpkg-deb", "-x", str(deb), str(staging)])
        write_json_atomic(staging / MARKER, {**identity, "sha256": digest, "package": package, "version": version})
        if root.exists():
            shutil.rmtree(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(root)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return PackageInfo(package, version, deb, digest, root)
