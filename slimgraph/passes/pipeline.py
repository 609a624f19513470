"""Pipelines: one parser for CLI specs (`a,b:opt=1,c`), TOML recipes and Python lists of passes."""

from __future__ import annotations

import inspect
import math
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import onnx_ir as ir

from slimgraph.calibration import Calibration
from slimgraph.errors import PipelineSpecError, SlimgraphError
from slimgraph.passes.base import SlimgraphPass
from slimgraph.passes.report import PassReport
from slimgraph.tolerance import EXACT, Tolerance


class Pipeline:
    """An ordered list of slimgraph passes, run in place as one onnx_ir ``Sequential``."""

    def __init__(self, passes: Iterable[SlimgraphPass] = ()) -> None:
        self.passes = list(passes)
        for p in self.passes:
            if not isinstance(p, SlimgraphPass):
                raise PipelineSpecError(f"{p!r} is not a slimgraph pass")

    @classmethod
    def parse(cls, spec: str) -> Pipeline:
        """Build a pipeline from a CLI spec such as ``fold-constants,quantize:int8,dynamic=true``.

        Commas separate passes; after ``name:`` the tokens ``key=value`` (or a bare first value,
        the pass's mode) are that pass's options until the next token without ``=``. A bare
        recipe name (``int8``) stands for that recipe's passes.
        """
        from slimgraph.passes import PASSES, RECIPES  # the registry imports this module

        entries: list[tuple[str, dict[str, Any], list[str]]] = []
        for raw in spec.split(","):
            token = raw.strip()
            if not token:
                continue
            if ":" in token and "=" not in token.partition(":")[0]:  # not key=2:4
                name, _, first = token.partition(":")
                entries.append((name.strip(), {}, []))
                _add_option(entries[-1], first.strip(), spec)
            elif "=" in token and entries:
                _add_option(entries[-1], token, spec)
            else:
                entries.append((token, {}, []))
        if not entries:
            raise PipelineSpecError(f"empty pass spec {spec!r}")
        passes: list[SlimgraphPass] = []
        for name, options, positional in entries:
            if name in RECIPES and name not in PASSES and not options and not positional:
                passes += cls.parse(RECIPES[name]).passes
            else:
                passes.append(make_pass(name, options, positional))
        return cls(passes)

    @classmethod
    def from_recipe(cls, path: str | Path) -> Pipeline:
        """Build a pipeline from a TOML recipe: a ``[[pass]]`` table per pass, ``name`` + options."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise PipelineSpecError(f"{path}: cannot read recipe: {exc}") from exc
        tables = data.get("pass")
        if not isinstance(tables, list) or not tables:
            raise PipelineSpecError(f"{path}: a recipe needs at least one [[pass]] table")
        passes = []
        for i, table in enumerate(tables):
            if not isinstance(table, dict):
                raise PipelineSpecError(f"{path}: [[pass]] #{i + 1} is not a table")
            table = dict(table)
            name = table.pop("name", None)
            if not isinstance(name, str):
                raise PipelineSpecError(f"{path}: [[pass]] #{i + 1} has no name")
            passes.append(make_pass(name, table, [], source=str(path)))
        return cls(passes)

    @classmethod
    def coerce(cls, passes: Pipeline | str | Iterable[SlimgraphPass] | None) -> Pipeline:
        """Accept what the API accepts for ``passes=``: a Pipeline, a spec/recipe path, or passes."""
        if passes is None:
            return cls()
        if isinstance(passes, Pipeline):
            return passes
        if isinstance(passes, (str, Path)):
            text = str(passes)
            if text.endswith(".toml"):
                return cls.from_recipe(text)
            return cls.parse(text)
        return cls(passes)

    @property
    def tolerance(self) -> Tolerance:
        """The loosest tolerance any pass in the pipeline declares."""
        tol = EXACT
        for p in self.passes:
            tol = tol.loosest(p.tolerance)
        return tol

    def bind_calibration(self, calibration: Calibration | None) -> None:
        """Give calibration data to the passes that need it and were not given their own."""
        for p in self.passes:
            if p.needs_calibration and p.calibration is None:
                if calibration is None:
                    raise PipelineSpecError(f"pass {p.name!r} needs calibration data (--calib)")
                p.calibration = calibration

    def bind_verification(self, feeds: list, check_top1: bool) -> None:
        """Give the verification feeds to the passes that judge their own result."""
        for p in self.passes:
            if p.wants_verification and p.verification is None:
                p.verification, p.check_top1 = list(feeds), check_top1

    @property
    def needs_training(self) -> bool:
        return any(p.needs_training for p in self.passes)

    def bind_training(self, training: Any, on_progress: Any = None) -> None:
        """Give training data (heal.data.TrainingData) to the passes that train, and where they
        report progress (a callable taking one line of text) if not to their own bar."""
        for p in self.passes:
            if p.needs_training and p.training is None:
                p.training = training
            if p.needs_training and on_progress is not None:
                p.on_progress = on_progress

    def run(self, model: ir.Model) -> tuple[ir.Model, list[PassReport]]:
        if not self.passes:
            return model, []
        try:
            result = ir.passes.Sequential(*self.passes)(model)
        except ir.passes.PassError as exc:
            # A pass's own SlimgraphError (an op it cannot handle, data it lacks) already names the
            # pass and what to do: surface it as itself, so the CLI reports it and exits 2.
            if isinstance(exc.__cause__, SlimgraphError):
                raise exc.__cause__ from None
            raise
        return result.model, [p.report for p in self.passes]

    def spec(self) -> str:
        return ",".join(_pass_spec(p) for p in self.passes)

    def __repr__(self) -> str:
        return f"Pipeline({self.passes!r})"


def _pass_spec(p: SlimgraphPass) -> str:
    """The shortest spec that rebuilds ``p``: its mode, then the options that differ from defaults."""
    params = inspect.signature(type(p).__init__).parameters
    opts = p.options()
    parts = []
    first = getattr(p, "positional_option", "mode")
    if first in opts:
        parts.append(str(opts.pop(first)))
    for key, value in opts.items():
        default = params[key].default if key in params else inspect.Parameter.empty
        empty = value in ([], ()) and default in (None, (), [])  # stored as a list when unset
        if not empty and (default is inspect.Parameter.empty or value != default):
            text = "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            parts.append(f"{key}={text}")
    return f"{p.name}:{','.join(parts)}" if parts else p.name


def _add_option(entry: tuple[str, dict[str, Any], list[str]], token: str, spec: str) -> None:
    name, options, positional = entry
    if not token:
        raise PipelineSpecError(f"pass {name!r} in {spec!r}: empty option after ':'")
    if "=" in token:
        key, _, value = token.partition("=")
        options[key.strip()] = value.strip()
    elif options or positional:
        raise PipelineSpecError(f"pass {name!r} in {spec!r}: option {token!r} needs key=value")
    else:
        positional.append(token)


def make_pass(
    name: str, options: Mapping[str, Any], positional: list[str], source: str = "pass spec"
) -> SlimgraphPass:
    """Instantiate the registered pass ``name`` with options coerced to its annotated types."""
    from slimgraph.passes import PASSES, RECIPES  # the registry imports this module

    cls = PASSES.get(name)
    if cls is None:
        raise PipelineSpecError(
            f"{source}: unknown pass {name!r}; valid passes: {', '.join(sorted(PASSES))}; "
            f"recipes: {', '.join(RECIPES)}"
        )
    params = {
        k: p
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if k != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }
    hints = typing.get_type_hints(cls.__init__)
    kwargs: dict[str, Any] = {}
    first = getattr(cls, "positional_option", "mode")  # what a bare first token sets
    if positional:
        if first not in params:
            raise PipelineSpecError(
                f"{source}: pass {name!r} takes no mode; got {positional[0]!r}"
                + (f"; options: {', '.join(params)}" if params else "")
            )
        kwargs[first] = _coerce(positional[0], hints.get(first, str), f"{source}: {name}:{first}")
    for key, raw in options.items():
        if key not in params:
            valid = ", ".join(params) or "none"
            raise PipelineSpecError(
                f"{source}: unknown option {key!r} for pass {name!r}; valid options: {valid}"
            )
        kwargs[key] = _coerce(raw, hints.get(key, str), f"{source}: {name}:{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise PipelineSpecError(f"{source}: pass {name!r}: {exc}") from exc


def _coerce(raw: Any, hint: Any, where: str) -> Any:
    """Turn a CLI string (or a TOML value) into the annotated type of an option; for a union
    (``float | str``), the first of its types that takes the string. A numeric option never takes
    NaN or an infinity, in any spelling (``nan``, ``-inf``, ``1e309``, TOML's ``inf``)."""
    targets = [hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        targets = [a for a in typing.get_args(hint) if a is not type(None)] or [str]
    numeric = [t.__name__ for t in targets if t in (int, float)]
    if numeric and _non_finite(raw):
        raise PipelineSpecError(f"{where}: {raw!r} is not a {' or '.join(numeric)}: NaN and "
                                "infinities are refused")
    if not isinstance(raw, str):  # a TOML value: already typed, so checked rather than converted
        if any(_is_typed(raw, t) for t in targets):
            return raw
        kind = " or ".join(getattr(t, "__name__", str(t)) for t in targets)
        raise PipelineSpecError(f"{where}: {raw!r} is not a {kind}")
    error: ValueError | None = None
    for target in targets:
        try:
            return _convert(raw, target)
        except ValueError as exc:
            error = exc
    kind = " or ".join(getattr(t, "__name__", str(t)) for t in targets)
    raise PipelineSpecError(f"{where}: {raw!r} is not a valid {kind}") from error


def _non_finite(raw: Any) -> bool:
    """Whether an option value is, or a string reads as, a float that is NaN or infinite."""
    if isinstance(raw, str):
        try:
            raw = float(raw)
        except ValueError:
            return False
    return isinstance(raw, float) and not math.isfinite(raw)


def _is_typed(raw: Any, target: Any) -> bool:
    """Whether a TOML value fits an option's type: an int serves a float, a bool no number, a
    list holds strings."""
    if isinstance(raw, bool) or target is bool:
        return isinstance(raw, bool) and target is bool
    if target is float:
        return isinstance(raw, (int, float))
    if typing.get_origin(target) in (list, tuple):
        return isinstance(raw, list) and all(isinstance(x, str) for x in raw)
    return isinstance(target, type) and isinstance(raw, target)


def _convert(raw: str, target: Any) -> Any:
    if target is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if target in (int, float):
        return target(raw)
    if typing.get_origin(target) in (list, tuple):
        return [s for s in raw.split("+") if s]
    return raw
