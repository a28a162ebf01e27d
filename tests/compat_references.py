"""birder's numbers for the stacks birder cannot be installed in (it needs Python >= 3.11 and torch
>= 2.10; the floor stack has neither), recorded by the current stack in the same run:

    .venv/bin/python tests/compat_references.py DIR     # birder's checkpoint files and outputs into DIR
    HIERADET_MMDET_REFERENCES=DIR python -m pytest @tests/compat_tests.txt   # in the other stack

With ``HIERADET_MMDET_REFERENCES`` set, conftest's ``birder_pair`` and ``birder_files`` are what this
file recorded: the files birder wrote, and :class:`RecordedBirder` stand-ins that hold birder's
weights and give birder's recorded outputs for the inputs the tests make (any other input is an
error, never a guess). The inputs are made as the tests make them (seeded); a stack whose random
numbers differed would fail on "not recorded", not pass.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent):  # run as a script: the tests' helpers, the repository's benchmarks.reference
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

ENV = "HIERADET_MMDET_REFERENCES"
FILE = "references.pt"
NETWORK = "hieradet_d_small_test"
LAYOUTS = ("small", "d_small")
READING_SIZES = ((64, 64), (96, 160))  # tests/weights/test_reading.py SIZES
BACKBONE_SIZE = (96, 160)  # tests/models/test_backbone.py SIZE


def inputs() -> list[torch.Tensor]:
    """Every input the selected tests give birder_pair's models, made as they make them."""
    torch.manual_seed(5)  # tests/weights/test_reading.py reference_features
    made = [torch.randn(1, 3, *hw) for hw in READING_SIZES]
    made.append(torch.randn(1, 3, *BACKBONE_SIZE, generator=torch.Generator().manual_seed(5)))  # test_backbone.py
    return made


def classifier_batch() -> torch.Tensor:
    """Normalised images for the classifier comparison (tests/test_compat_references.py)."""
    from helpers import CHECKPOINT_SIZE

    return torch.randn(3, 3, CHECKPOINT_SIZE, CHECKPOINT_SIZE, generator=torch.Generator().manual_seed(7))


def record(directory: Path) -> Path:
    """birder_pair's models (as conftest makes them) saved by birder into ``directory``, and their
    outputs: stage maps for :func:`inputs`, embedding and logits for :func:`classifier_batch`."""
    from birder.data.transforms.classification import get_rgb_stats
    from birder.model_registry import registry

    from helpers import CHECKPOINT_SIZE, CLASS_TO_IDX, make_birder_model, save_birder_checkpoints

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    d_small = make_birder_model("hieradet_d_small", len(CLASS_TO_IDX), CHECKPOINT_SIZE, seed=11)
    small = registry.net_factory("hieradet_small", len(CLASS_TO_IDX), size=(CHECKPOINT_SIZE,) * 2).eval()
    small.load_state_dict(d_small.state_dict())
    pair = {"small": small, "d_small": d_small}
    stats = get_rgb_stats("birder")
    files = save_birder_checkpoints(d_small, NETWORK, directory, stats)
    batch = classifier_batch()
    with torch.no_grad():
        features = {layout: [(x, list(pair[layout].detection_features(x).values())) for x in inputs()]
                    for layout in LAYOUTS}
        embedding = {layout: pair[layout].embedding(batch) for layout in LAYOUTS}
        logits = {layout: pair[layout].classify(embedding[layout]) for layout in LAYOUTS}
    import birder

    torch.save(dict(features=features, batch=batch, embedding=embedding, logits=logits,
                    rgb_stats={k: list(v) for k, v in stats.items()},
                    files={k: str(Path(v).resolve().relative_to(directory.resolve())) for k, v in files.items()},
                    recorded_with=dict(torch=str(torch.__version__), birder=str(birder.__version__))),
               directory / FILE)
    return directory


class RecordedBirder:
    """A birder HieraDet as the tests use one (state_dict, detection_features), from a recording."""

    def __init__(self, layout: str, state: dict, recorded: list) -> None:
        self.layout, self._state, self._recorded = layout, state, recorded

    def state_dict(self) -> dict:
        return dict(self._state)

    def detection_features(self, x: torch.Tensor) -> dict:
        for seen, features in self._recorded:
            if seen.shape == x.shape and torch.equal(seen, x):
                return {f"stage{i + 1}": f.clone() for i, f in enumerate(features)}
        raise LookupError(f"birder's {self.layout} outputs for this {tuple(x.shape)} input were not recorded "
                          f"(tests/compat_references.py inputs() makes the inputs the selected tests use)")


def recorded_directory() -> Path:
    return Path(os.environ[ENV])


def load(directory: Optional[Path] = None) -> dict:
    from hieradet_mmdet.weights.reader import load_file

    content, _ = load_file(Path(directory or recorded_directory()) / FILE)
    return content


def recorded_pair() -> dict:
    from hieradet_mmdet.weights.reader import load_file

    references = load()
    state = load_file(recorded_directory() / references["files"]["pt"])[0]["state"]
    return {layout: RecordedBirder(layout, state, references["features"][layout]) for layout in LAYOUTS}


def recorded_files() -> dict:
    references = load()
    directory = recorded_directory()
    return dict({k: directory / v for k, v in references["files"].items()}, rgb_stats=references["rgb_stats"],
                directory=directory)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/compat_references.py DIR")
    print(f"[compat] birder's references written to {record(Path(sys.argv[1]))}")
