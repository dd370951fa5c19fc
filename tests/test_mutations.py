"""The planted-bug list of scripts/mutations.py stays applicable: every snippet occurs exactly once
in its file (the script itself runs the named tests against each mutation; see its docstring)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("mutations", ROOT / "scripts" / "mutations.py")
mutations = importlib.util.module_from_spec(_spec)
sys.modules["mutations"] = mutations  # dataclasses look their module up there
_spec.loader.exec_module(mutations)


@pytest.mark.parametrize("m", mutations.MUTATIONS, ids=lambda m: m.name)
def test_each_planted_bug_applies_to_exactly_one_place(m):
    assert (ROOT / m.file).read_text().count(m.old) == 1
    assert m.old != m.new and m.tests


def test_the_list_covers_every_layer():
    layers = {Path(m.file).parts[0] + "/" + Path(m.file).parts[1] for m in mutations.MUTATIONS}
    assert {"csrc/cpu", "csrc/ops", "semask_fast/kernels", "semask_fast/ops"} <= layers
