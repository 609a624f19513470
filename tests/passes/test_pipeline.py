"""The one spec parser behind CLI strings, TOML recipes and Python lists."""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir
import pytest

from slimgraph.errors import PipelineSpecError
from slimgraph.passes import PASSES, FoldConstantsPass, Pipeline, recipe
from slimgraph.passes.base import SlimgraphPass
from slimgraph.tolerance import Tolerance


class _OptionsPass(SlimgraphPass):
    """A pass with typed options, registered only inside these tests."""

    name = "test-options"
    tolerance: ClassVar[Tolerance] = Tolerance(max_rel_err=0.1, min_cosine=0.99, min_top1=0.9)

    def __init__(self, mode: str = "a", *, ratio: float = 0.5, round_to: int = 1,
                 dynamic: bool = False) -> None:
        if not 0 < ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {ratio}")
        self.mode, self.ratio, self.round_to, self.dynamic = mode, ratio, round_to, dynamic
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, False)


@pytest.fixture
def options_pass(monkeypatch):
    monkeypatch.setitem(PASSES, _OptionsPass.name, _OptionsPass)
    return _OptionsPass


def test_parse_single_pass():
    pipeline = Pipeline.parse("fold-constants")
    assert [type(p) for p in pipeline.passes] == [FoldConstantsPass]


def test_parse_options_mode_and_following_pass(options_pass):
    pipeline = Pipeline.parse("fold-constants,test-options:b,ratio=0.25,round_to=8,dynamic=true,"
                              "fold-constants")
    assert [p.name for p in pipeline.passes] == ["fold-constants", "test-options", "fold-constants"]
    opt = pipeline.passes[1]
    assert (opt.mode, opt.ratio, opt.round_to, opt.dynamic) == ("b", 0.25, 8, True)
    assert isinstance(opt.ratio, float) and isinstance(opt.round_to, int)


def test_spec_round_trips(options_pass):
    spec = "fold-constants,test-options:mode=b,ratio=0.25,round_to=8,dynamic=True"
    assert Pipeline.parse(Pipeline.parse(spec).spec()).spec() == Pipeline.parse(spec).spec()


def test_tolerance_is_the_loosest(options_pass):
    assert Pipeline.parse("fold-constants").tolerance == Tolerance()
    assert Pipeline.parse("fold-constants,test-options").tolerance.max_rel_err == 0.1


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("fold-constant", "unknown pass 'fold-constant'; valid passes: fold-constants"),
        ("test-options:speed=2", "unknown option 'speed' for pass 'test-options'"),
        ("test-options:ratio=half", "test-options:ratio: 'half' is not a valid float"),
        ("test-options:ratio=1.5", "ratio must be in (0, 1)"),
        ("test-options:dynamic=maybe", "'maybe' is not a valid bool"),
        ("fold-constants:int8", "pass 'fold-constants' takes no mode"),
        ("", "empty pass spec"),
        ("test-options:", "empty option"),
    ],
)
def test_bad_specs_name_the_fault(options_pass, spec, fragment):
    with pytest.raises(PipelineSpecError) as info:
        Pipeline.parse(spec)
    assert fragment in str(info.value)


def test_recipe_builds_the_same_objects(options_pass, tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[pass]]\nname = "fold-constants"\n\n'
                    '[[pass]]\nname = "test-options"\nratio = 0.25\nround_to = 8\n')
    from_recipe = Pipeline.from_recipe(path)
    from_cli = Pipeline.parse("fold-constants,test-options:ratio=0.25,round_to=8")
    assert from_recipe.spec() == from_cli.spec()
    assert repr(from_recipe) == repr(from_cli)


def test_bad_recipes(tmp_path):
    missing = tmp_path / "none.toml"
    with pytest.raises(PipelineSpecError, match="none.toml: cannot read recipe"):
        Pipeline.from_recipe(missing)
    bad = tmp_path / "bad.toml"
    bad.write_text("[[pass]]\nname = 'nope'\n")
    with pytest.raises(PipelineSpecError, match="bad.toml: unknown pass 'nope'"):
        Pipeline.from_recipe(bad)
    empty = tmp_path / "empty.toml"
    empty.write_text("title = 'x'\n")
    with pytest.raises(PipelineSpecError, match="at least one"):
        Pipeline.from_recipe(empty)


def test_named_recipes():
    assert recipe("lossless").spec() == "fold-constants"
    with pytest.raises(PipelineSpecError, match="valid recipes: lossless"):
        recipe("fast")


def test_python_objects_accepted():
    pipeline = Pipeline.coerce([FoldConstantsPass()])
    assert pipeline.spec() == "fold-constants"
    with pytest.raises(PipelineSpecError):
        Pipeline([object()])


def test_recipe_names_expand_in_specs():
    assert Pipeline.parse("int8").spec() == Pipeline.parse("fold-constants,quantize:int8").spec()
    assert [p.name for p in Pipeline.parse("lossless,quantize:int8").passes] == [
        "fold-constants", "quantize"]


def test_spec_shows_only_what_differs_from_defaults():
    spec = Pipeline.parse("quantize:int8,smooth=0.75").spec()
    assert spec == "quantize:int8,smooth=0.75"
    assert Pipeline.parse(spec).spec() == spec
