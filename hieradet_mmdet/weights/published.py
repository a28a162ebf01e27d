"""Published HieraDet weights, and getting checkpoint files onto the local disk.

This module knows *where* weights come from (names, URLs, checksums, the download cache);
:mod:`.reader` knows how to read them. Downloads go once into torch's cache,
``torch.hub.get_dir()/checkpoints``, the same place ``torch.hub`` and timm use.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union
from urllib.parse import unquote, urlsplit

import torch

from .errors import CheckpointError

DOWNLOAD_TIMEOUT_S = 60  # per socket operation, so that a firewalled machine fails instead of hanging


class WeightsUnavailableError(CheckpointError):
    """Weights could not be had: offline, bad URL, checksum mismatch, unknown name, no such file."""


@dataclass(frozen=True)
class PretrainedWeights:
    name: str
    url: str
    sha256: str
    file_size_mb: float
    resolution: tuple[int, int]
    num_classes: int
    network: str  # birder's network name; our arch is the part after 'hieradet_'
    description: str
    aliases: tuple[str, ...] = ()

    @property
    def file_name(self) -> str:
        return url_file_name(self.url)

    @property
    def arch(self) -> str:
        return self.network[len("hieradet_"):]


def _register(*weights: PretrainedWeights) -> dict[str, PretrainedWeights]:
    return {w.name: w for w in weights}


PRETRAINED = _register(
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
        aliases=("hieradet_small_dino-v2-imagenet12k",),  # the name it was trained under
    ),
)


def get_pretrained(name: str) -> Optional[PretrainedWeights]:
    """The published weights called ``name`` (or one of its aliases); None for other strings."""
    return PRETRAINED.get(name) or next((w for w in PRETRAINED.values() if name in w.aliases), None)


def published_names() -> list[str]:
    return sorted(PRETRAINED) + sorted(a for w in PRETRAINED.values() for a in w.aliases)


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
    """A published name, a URL or a local path as a local file (downloaded if needed), and for
    published weights their entry."""
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
    """The cached copy of ``url`` (cached by file name), downloaded first if it is missing.

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
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            # Writes a temporary file beside dst and renames it once complete and (hash_prefix)
            # verified, so dst only ever appears whole; a failed download leaves nothing behind.
            torch.hub.download_url_to_file(url, str(dst), hash_prefix=sha256, progress=progress)
    except RuntimeError as err:
        got = re.search(r'got "([0-9a-f]+)"', str(err))
        if "invalid hash value" not in str(err) or not got:
            raise
        raise WeightsUnavailableError(
            f"Downloaded {url}, but its sha256 is {got.group(1)} instead of the published {sha256}; the "
            "download was deleted. Run again to retry.") from None
    except (OSError, ValueError) as err:  # URLError (DNS, refused, HTTP errors) is an OSError; so are timeouts
        raise WeightsUnavailableError(
            f"Could not download {url}: {getattr(err, 'reason', None) or err}.\n"
            + _manual_instructions(url, dst, weights)) from err
    return dst


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """torch.hub's download opens its connection without a timeout; a firewall that drops packets
    would leave it hanging for good. A default timeout applies to sockets opened meanwhile."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _manual_instructions(url: str, dst: Path, weights: Optional[PretrainedWeights]) -> str:
    what = f" ({weights.file_size_mb} MB, sha256 {weights.sha256})" if weights else ""
    return (f"Without network access here, fetch the file elsewhere:\n"
            f"    {url}{what}\n"
            f"and put it at\n"
            f"    {dst}\n"
            f"where it is found automatically, or anywhere and point the config at it:\n"
            f"    init_cfg=dict(type='Pretrained', checkpoint='/path/to/{dst.name}')")
