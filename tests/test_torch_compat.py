"""What differs between the torch versions this package is tested on (hieradet_mmdet.torch_compat):
the same answers from the spelling each torch has, and the export tools saying in one line what
they need where this torch lacks it."""

from __future__ import annotations

import torch

from helpers import ROOT, run_tool
from hieradet_mmdet import torch_compat


def test_cpu_autocast_dtype_is_what_autocast_casts_to():
    assert torch_compat.cpu_autocast_dtype() is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch_compat.cpu_autocast_dtype() == torch.bfloat16
        assert torch.nn.functional.linear(torch.ones(1, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert torch_compat.cpu_autocast_dtype() is None


def test_seeded_generator_deep_copies_with_its_state():
    import copy

    generator = torch_compat.SeededGenerator(7)
    torch.rand(3, generator=generator)
    copied = copy.deepcopy(dict(generator=generator))["generator"]  # as MMEngine copies a dataloader config
    assert torch.equal(torch.rand(4, generator=copied), torch.rand(4, generator=generator))
    assert torch.equal(torch.rand(2, generator=torch_compat.SeededGenerator(7)),
                       torch.rand(2, generator=torch.Generator().manual_seed(7)))


def test_compiling_is_seen_by_the_model():
    from hieradet_mmdet.models.hieradet import is_exporting

    assert not is_exporting()
    seen = []
    compiled = torch.compile(lambda x: x + (seen.append(torch_compat.compiler_is_compiling()) or 1), backend="eager")
    compiled(torch.ones(2))
    assert seen == [True]


def test_missing_export_apis_are_named_in_one_line(monkeypatch):
    monkeypatch.setattr(torch_compat, "_has", lambda api: api == "torch.library.custom_op")
    message = torch_compat.export_unsupported()
    assert message.startswith("ONNX and torch.export need torch >= 2.6 (this is torch ")
    assert "torch.export.Dim.AUTO" in message and "custom_op" not in message and "\n" not in message


def test_export_tool_says_what_it_needs_or_exports(tmp_path):
    """Where this torch lacks what export needs, tools/export.py stops at once with that one line;
    elsewhere it goes on to read the checkpoint (here a missing one)."""
    proc = run_tool(ROOT / "tools" / "export.py", "--classifier", tmp_path / "missing.pt", "--out",
                    tmp_path / "model.onnx")
    assert proc.returncode == 2
    needs = torch_compat.export_unsupported()
    if needs:
        assert proc.stderr.strip() == f"error: {needs}"
    else:
        assert "need torch" not in proc.stderr and "missing.pt" in proc.stderr, proc.stderr
