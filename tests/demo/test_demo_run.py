"""The demo's run (hieradet_mmdet.demo.run): where it looks for the backbone weights. The whole
demo runs in tests/tools/test_demo.py."""

from hieradet_mmdet.demo import run as demo


def test_without_weights_the_demo_says_so_and_where_to_put_them(hub_dir, tmp_path):
    path, note = demo.find_weights(None)
    assert path is None
    assert "RANDOM" in note and demo.WEIGHTS_URL in note
    assert str(hub_dir) in note
    explicit = tmp_path / "mine.pt"
    explicit.write_bytes(b"x")
    assert demo.find_weights(str(explicit))[0] == str(explicit)
