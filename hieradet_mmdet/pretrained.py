"""Published HieraDet weights and getting checkpoint files onto the local disk.

This module knows *where* weights come from (names, URLs, checksums, the download cache);
:mod:`hieradet_mmdet.checkpoint` knows how to read them. Downloads go once into torch's cache,
``torch.hub.get_dir()/checkpoints``, the same place ``torch.hub`` and timm use.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union
from urllib.error import URLError
from urllib.parse import unquote, urlsplit
from urllib.request import Request, urlopen

import torch

DOWNLOAD_TIMEOUT_S = 60  # per network operation, so a firewalled machine fails instead of hanging


class WeightsUnavailableError(RuntimeError):
    """A checkpoint could not be fetched (offline, bad URL, checksum mismatch, unknown name)."""


@dataclass(frozen=True)
class PretrainedWeights:
    name: str
    url: str
    sha256: str
    file_size_mb: float
    resolution: tuple[int, int]
    num_classes: int
    network: str  # birder's network name; ours is the part after 'hieradet_'
    description: str

    @property
    def file_name(self) -> str:
        return url_file_name(self.url)

    @property
    def arch(self) -> str:
        return self.network[len("hieradet_"):]


PRETRAINED: dict[str, PretrainedWeights] = {
    w.name: w
    for w in [
        PretrainedWeights(
            name="hieradet_d_small_dino-v2-imagenet12k",
            url="https://huggingface.co/birder-project/hieradet_d_small_dino-v2-imagenet12k/resolve/main/"
                "hieradet_d_small_dino-v2-imagenet12k.pt",
            sha256="b89dd6c13d061fe8a09d051bb3d76e632e650067ca71578e37b02033107c9963",
            file_size_mb=164.8,
            resolution=(256, 256),
            num_classes=11821,
            network="hieradet_d_small",
            description="HieraDet-S pretrained with DINOv2, then fine-tuned on ImageNet-12K (birder)",
        ),
    ]
}
# Names under which the same files were published or referred to before.
ALIASES = {"hieradet_small_dino-v2-imagenet12k": "hieradet_d_small_dino-v2-imagenet12k"}


def get_pretrained(name: str) -> Optional[PretrainedWeights]:
    """The published weights called ``name`` (or one of its aliases), None for other strings."""
    return PRETRAINED.get(ALIASES.get(name, name))


def published_names() -> list[str]:
    return sorted(PRETRAINED) + sorted(ALIASES)


def cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def url_file_name(url: str) -> str:
    return unquote(os.path.basename(urlsplit(url).path))


def is_url(source: str) -> bool:
    return urlsplit(source).scheme in ("http", "https", "file")


def sha256_of(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_source(source: Union[str, os.PathLike], *, progress: bool = True) -> tuple[Path, Optional[PretrainedWeights]]:
    """Turn a published name, a URL or a local path into a local file (downloading if needed).

    Returns the file and, for published weights, their metadata."""
    text = os.fspath(source)
    weights = get_pretrained(text)
    if weights is not None:
        return fetch(weights.url, weights.sha256, weights=weights, progress=progress), weights
    if is_url(text):
        known = next((w for w in PRETRAINED.values() if w.url == text), None)
        return fetch(text, known.sha256 if known else None, weights=known, progress=progress), known

    path = Path(text).expanduser()
    if path.is_file():
        return path, None
    if path.exists():
        raise WeightsUnavailableError(f"Checkpoint {text!r} is not a file.")
    if os.sep not in text and "/" not in text and not path.suffix:
        raise WeightsUnavailableError(
            f"Unknown HieraDet weights name {text!r} (and no such file). Published names: "
            f"{', '.join(published_names())}. Otherwise pass a path, or an http(s) URL.")
    raise WeightsUnavailableError(f"Checkpoint file not found: {text} (resolved to {path.resolve()}).")


def fetch(url: str, sha256: Optional[str] = None, *, weights: Optional[PretrainedWeights] = None,
          progress: bool = True) -> Path:
    """The cached copy of ``url`` (cached by file name), downloading it first if it is missing.

    A cached file of published weights is checked against their sha256 every time, so that a
    truncated manual download fails here with a clear message instead of later in unpickling."""
    dst = cache_dir() / url_file_name(url)
    if dst.is_file():
        if sha256 is not None:
            actual = sha256_of(dst)
            if actual != sha256:
                raise WeightsUnavailableError(
                    f"The cached checkpoint {dst} has sha256 {actual}, but {url} has sha256 {sha256} "
                    "(an interrupted manual download or a different file?). Delete it and run again to "
                    "download it anew.\n" + _manual_instructions(url, dst, weights))
        return dst

    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        download(url, dst, sha256, progress=progress)
    except (URLError, OSError, ValueError) as err:
        # URLError covers DNS/refused/HTTP errors, OSError timeouts and resets mid-transfer.
        raise WeightsUnavailableError(
            f"Could not download {url}: {getattr(err, 'reason', None) or err}.\n"
            + _manual_instructions(url, dst, weights)) from err
    return dst


def download(url: str, dst: Path, sha256: Optional[str] = None, *, progress: bool = True) -> None:
    """Download ``url`` to ``dst`` through a temporary file in the same folder, so ``dst`` only
    ever appears complete and verified; on any failure the temporary file is deleted."""
    request = Request(url, headers={"User-Agent": "hieradet-mmdet"})
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out, urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            bar = _ProgressBar(dst.name, int(length) if length else None, enabled=progress)
            digest = hashlib.sha256()
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
            bar.close()
        if sha256 is not None and digest.hexdigest() != sha256:
            raise WeightsUnavailableError(
                f"Downloaded {url}, but its sha256 is {digest.hexdigest()} instead of the published "
                f"{sha256}; the download was deleted. Run again to retry.")
        os.replace(tmp_name, dst)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)


def _manual_instructions(url: str, dst: Path, weights: Optional[PretrainedWeights]) -> str:
    what = f" ({weights.file_size_mb} MB, sha256 {weights.sha256})" if weights else ""
    return (f"Without network access here, fetch the file elsewhere:\n"
            f"    {url}{what}\n"
            f"and put it at\n"
            f"    {dst}\n"
            f"where it is found automatically, or anywhere and point the config at it:\n"
            f"    init_cfg=dict(type='Pretrained', checkpoint='/path/to/{dst.name}')")


class _ProgressBar:
    """A one-line progress bar on stderr (no third-party dependency)."""

    WIDTH = 30

    def __init__(self, label: str, total: Optional[int], enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.done = 0
        self._shown = None

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        mb = self.done / 1e6
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            text = (f"\r{self.label}: [{'#' * int(fraction * self.WIDTH):<{self.WIDTH}}] "
                    f"{fraction:4.0%} {mb:.1f}/{self.total / 1e6:.1f} MB")
            key = int(fraction * 100)
        else:
            text, key = f"\r{self.label}: {mb:.1f} MB", int(mb)
        if key != self._shown:  # redraw per percent / MB, not per chunk
            self._shown = key
            sys.stderr.write(text)
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
