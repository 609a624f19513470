"""Hostile pass (and backend) options: NaN, infinities and out-of-range numbers, from the CLI spec,
a TOML recipe or Python, each refused naming the pass and the option; valid values still pass."""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path

import onnx
import pytest
from conftest import make_tiny_cnn

from slimgraph.backends import BACKENDS, parse_backend_spec
from slimgraph.cli import main
from slimgraph.errors import BackendError, PipelineSpecError
from slimgraph.passes import PASSES, Pipeline, make_pass


def _numeric_options() -> list[tuple[str, str]]:
    """(pass, option) for every option of every registered pass whose type takes an int or float."""
    out = []
    for name, cls in PASSES.items():
        hints = typing.get_type_hints(cls.__init__)
        for option in inspect.signature(cls.__init__).parameters:
            hint = hints.get(option)
            kinds = (typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType)
                     else (hint,))
            if int in kinds or float in kinds:
                out.append((name, option))
    return out


NUMERIC = _numeric_options()
CLI_SPELLINGS = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e309", "-1e999"]
TOML_SPELLINGS = ["nan", "inf", "-inf", "+inf"]
# A finite value out of each numeric option's range, per option (every numeric option has one).
OUT_OF_RANGE: dict[tuple[str, str], list[str]] = {
    ("prune-channels", "ratio"): ["0", "1", "1.5", "-0.1"],
    ("prune-channels", "macs"): ["0", "1.2"],
    ("prune-channels", "heads"): ["1", "-0.5"],
    ("prune-channels", "round_to"): ["0", "-8"],
    ("prune-layers", "keep"): ["-1"],
    ("prune-layers", "ratio"): ["0", "1"],
    ("quantize", "percentile"): ["50", "100.5", "-1"],
    ("quantize", "tolerance"): ["0", "1.01"],
    ("quantize", "block"): ["0", "7", "-32"],
    ("quantize", "smooth"): ["0", "1.5", "-1"],
    ("quantize", "max_float"): ["-1"],
    ("heal", "steps"): ["0", "-5"],
    ("heal", "lr"): ["0", "-1"],
    ("heal", "batch"): ["0"],
    ("heal", "temperature"): ["0", "-2"],
    ("heal", "alpha"): ["-0.1", "1.5"],
    ("heal", "workers"): ["0"],
    ("heal", "seed"): [str(2**64), str(-(2**63) - 1)],
    ("heal", "hidden"): ["-1"],
    ("heal", "eval_every"): ["-1"],
    ("sparsify", "sparsity"): ["0", "1", "-0.5", "2"],
    ("share-weights", "bits"): ["0", "9"],
    ("share-weights", "iterations"): ["0"],
}


def test_every_numeric_option_is_covered():
    assert len(NUMERIC) >= 20  # the introspection found the options
    assert set(NUMERIC) == set(OUT_OF_RANGE), "a numeric option without a range case"


def _refused(exc: pytest.ExceptionInfo, name: str, option: str) -> None:
    text = str(exc.value)
    assert "\n" not in text
    assert name in text and option in text, text


@pytest.mark.parametrize("spelling", CLI_SPELLINGS)
@pytest.mark.parametrize("name, option", NUMERIC)
def test_cli_spec_refuses_non_finite(name, option, spelling):
    with pytest.raises(PipelineSpecError, match="NaN and infinities are refused") as exc:
        Pipeline.parse(f"{name}:{option}={spelling}")
    _refused(exc, f"{name}:{option}", repr(spelling))


@pytest.mark.parametrize("spelling", TOML_SPELLINGS)
@pytest.mark.parametrize("name, option", NUMERIC)
def test_recipe_refuses_non_finite(tmp_path, name, option, spelling):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[[pass]]\nname = "{name}"\n{option} = {spelling}\n')
    with pytest.raises(PipelineSpecError, match="NaN and infinities are refused") as exc:
        Pipeline.from_recipe(recipe)
    _refused(exc, str(recipe), f"{name}:{option}")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name, option", NUMERIC)
def test_python_options_refuse_non_finite(name, option, value):
    with pytest.raises(PipelineSpecError) as exc:
        make_pass(name, {option: value}, [])
    _refused(exc, name, option)


@pytest.mark.parametrize("spec", ["sparsify:nan", "sparsify:inf", "sparsify:-1e400"])
def test_a_bare_mode_is_checked_too(spec):
    with pytest.raises(PipelineSpecError, match="sparsify:sparsity"):
        Pipeline.parse(spec)


@pytest.mark.parametrize("name, option, value",
                         [(n, o, v) for (n, o), values in OUT_OF_RANGE.items() for v in values])
def test_out_of_range_is_refused_by_the_pass(name, option, value):
    with pytest.raises(PipelineSpecError) as exc:
        Pipeline.parse(f"{name}:{option}={value}")
    _refused(exc, name, option)


@pytest.mark.parametrize("spec", [
    "sparsify:0.5", "sparsify:0.5,pattern=2:4", "prune-channels:ratio=0.25,round_to=8",
    "prune-layers:keep=2", "quantize:int8,percentile=99.9,tolerance=0.99,smooth=0.5",
    "quantize:int8,smooth=auto", "quantize:int4,block=64", "heal:steps=10,lr=1e-4,hidden=0.5,seed=-1",
    "share-weights:bits=8,iterations=5", "int8-dynamic",
])
def test_valid_options_still_pass(spec):
    assert Pipeline.parse(Pipeline.parse(spec).spec()).spec() == Pipeline.parse(spec).spec()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e309"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_options_refuse_non_finite(backend, value):
    with pytest.raises(BackendError, match="not a finite number") as exc:
        parse_backend_spec(f"{backend}:some_option={value}")
    _refused(exc, backend, "some_option")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    onnx.save_model(make_tiny_cnn(), path)
    return path


@pytest.mark.parametrize("flag, spec, fragment", [
    ("--passes", "heal:steps=inf", "heal:steps: 'inf'"),
    ("--passes", "quantize:int8,tolerance=nan", "quantize:tolerance: 'nan'"),
    ("--passes", "heal:lr=-1", "lr must be a finite number > 0"),
    ("--backend", "hls:clock_ns=nan", "clock_ns='nan' is not a finite number"),
])
def test_cli_refuses_in_one_line_and_writes_nothing(tiny, tmp_path, capsys, flag, spec, fragment):
    out = tmp_path / "out"
    assert main(["export", str(tiny), flag, spec, "-o", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert fragment in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []
