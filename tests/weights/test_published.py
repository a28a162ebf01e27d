"""Published names and URLs: downloaded once into torch's cache, checked, and explained offline."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import os
import re
import threading
from pathlib import Path

import pytest
import torch

from helpers import CHECKPOINT_SIZE, PUBLISHED, free_port
from hieradet_mmdet.weights import WeightsUnavailableError, published, read_checkpoint


@pytest.fixture
def served_published(birder_files, tmp_path, monkeypatch):
    """The published entry pointed at a local file:// copy of a birder checkpoint."""
    served = tmp_path / "server" / f"{PUBLISHED}.pt"
    served.parent.mkdir()
    served.write_bytes(Path(birder_files["pt"]).read_bytes())
    entry = dataclasses.replace(published.PRETRAINED[PUBLISHED], url=served.as_uri(),
                                sha256=published.sha256_of(served))
    monkeypatch.setitem(published.PRETRAINED, PUBLISHED, entry)
    return served


def test_published_name_downloads_once_verifies_and_caches(served_published, hub_dir, capfd, birder_pair):
    ckpt = read_checkpoint(PUBLISHED)
    cached = hub_dir / f"{PUBLISHED}.pt"
    assert ckpt.path == cached and cached.read_bytes() == served_published.read_bytes()
    assert "100%" in capfd.readouterr().err  # the progress bar
    assert ckpt.metadata["weights"] == PUBLISHED and ckpt.arch == "d_small"
    assert ckpt.metadata["size"] == (CHECKPOINT_SIZE, CHECKPOINT_SIZE)  # the file's own signature wins

    served_published.unlink()  # now only the cache has it; the alias resolves to the same file
    assert read_checkpoint("hieradet_small_dino-v2-imagenet12k").path == cached
    assert sorted(os.listdir(hub_dir)) == [f"{PUBLISHED}.pt"]

    cached.write_bytes(cached.read_bytes()[:1000])  # e.g. an interrupted manual download
    with pytest.raises(WeightsUnavailableError, match=f"cached checkpoint {re.escape(str(cached))} has sha256"):
        read_checkpoint(PUBLISHED)


def test_checksum_mismatch_deletes_the_download(served_published, hub_dir, monkeypatch):
    entry = dataclasses.replace(published.PRETRAINED[PUBLISHED], sha256="0" * 64)
    monkeypatch.setitem(published.PRETRAINED, PUBLISHED, entry)
    with pytest.raises(WeightsUnavailableError, match="sha256 .* instead of the published 0000"):
        read_checkpoint(PUBLISHED, progress=False)
    assert os.listdir(hub_dir) == []


def test_offline_published_name_says_what_to_fetch_and_where(hub_dir, monkeypatch):
    from urllib.error import URLError

    def no_network(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    for name in (PUBLISHED, "hieradet_small_dino-v2-imagenet12k"):
        with pytest.raises(WeightsUnavailableError) as info:
            read_checkpoint(name)
        message = str(info.value)
        assert "https://huggingface.co/birder-project/hieradet_d_small_dino-v2-imagenet12k/resolve/main/" \
               "hieradet_d_small_dino-v2-imagenet12k.pt" in message
        assert "b89dd6c13d061fe8a09d051bb3d76e632e650067ca71578e37b02033107c9963" in message
        assert str(hub_dir / f"{PUBLISHED}.pt") in message
        assert "init_cfg=dict(type='Pretrained', checkpoint='/path/to/" in message
        assert "name resolution" in message
    assert os.listdir(hub_dir) == []


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_url_downloads_into_cache_by_file_name(birder_files, hub_dir):
    directory = Path(birder_files["pt"]).parent
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{Path(birder_files['pt']).name}"
    try:
        ckpt = read_checkpoint(url, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert ckpt.path == hub_dir / Path(birder_files["pt"]).name and ckpt.has_head
    assert read_checkpoint(url).path == ckpt.path  # served from the cache now that the server is gone

    offline = f"http://127.0.0.1:{free_port()}/elsewhere.pt"
    with pytest.raises(WeightsUnavailableError, match=r"Could not download .*elsewhere.pt") as info:
        read_checkpoint(offline)
    assert str(hub_dir / "elsewhere.pt") in str(info.value)
    assert not (hub_dir / "elsewhere.pt").exists()
