"""catalogue: the shipped device catalogue, an extra one, and the checks every entry passes.

Every field of every device and cpu family is checked when a catalogue is read: its type,
finiteness and range (``TOPS_RANGE``, ``GBPS_RANGE``, ... below: generous physical ceilings), names
from a safe alphabet, kinds and precisions from their lists. A bad one is a CatalogueError naming
the file, the entry and the field, so no NaN, zero or negative figure reaches the arithmetic.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimgraph.advise.device import BITS, Device, _cpu_tops
from slimgraph.advise.host import HOST, host_device
from slimgraph.errors import CatalogueError

CATALOGUE = Path(__file__).with_name("devices.toml")


def load_catalogue(extra: str | Path | None = None, host: bool = True) -> list[Device]:
    """The shipped devices, then ``extra``'s (same name replaces), then this machine's CPU. Every
    field of every entry is checked here; a bad one raises CatalogueError naming file and entry."""
    families, entries = _read_catalogue(CATALOGUE)
    if extra is not None:
        more_families, more_entries = _read_catalogue(Path(extra))
        families.update(more_families)
        entries.update(more_entries)
    devices = [_device(entry, families, where) for entry, where in entries.values()]
    if host:
        local = host_device(families)
        if local is not None:
            devices.append(local)
    return devices


# Sane physical ceilings for catalogue figures: far above any single device built (the largest, a
# wafer-scale engine, claims 125 POPS and 21 PB/s on chip), far below where the arithmetic
# overflows. The floors keep every bound finite. A figure outside them is a unit slip.
TOPS_RANGE = (1e-6, 1e6)  # tera-operations/s per precision: 1 MOPS .. 1 EOPS
GBPS_RANGE = (1e-3, 1e8)  # GB/s: 1 MB/s .. 100 PB/s
MEMORY_GB_RANGE = (1e-6, 1e7)  # GB: 1 kB .. 10 PB
MAX_PRICE = 1e6  # USD per device-hour; a price, where given, is > 0
KINDS = ("cpu", "gpu", "tpu", "fpga")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")

Check = Callable[[Any], str | None]  # what is wrong with a value (appended to its field), or None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _scalar(test: Callable[[Any], bool], wanted: str) -> Check:
    return lambda value: None if test(value) else f" = {_show(value)}: must be {wanted}"


def _number(low: float, high: float, *, integer: bool = False, above: bool = False) -> Check:
    """A TOML number (an integer where ``integer``; never a bool), finite, in [low, high] (or
    (low, high] where ``above``)."""
    types = int if integer else (int, float)

    def test(v: Any) -> bool:
        return (isinstance(v, types) and not isinstance(v, bool) and math.isfinite(v)
                and (v > low if above else v >= low) and v <= high)

    span = f"{'(' if above else '['}{low:g}, {high:g}]"
    return _scalar(test, f"{'an integer' if integer else 'a number'} in {span}")


def _table_of(keys: tuple[str, ...], inner: Check) -> Check:
    """A TOML table with at least one of ``keys`` (and no other), each value passing ``inner``."""
    def check(value: Any) -> str | None:
        if not isinstance(value, dict) or not value:
            return f" = {_show(value)}: must be a table of {', '.join(keys)}"
        for key, item in value.items():
            if key not in keys:
                return f": unknown key {_show(key)}; valid: {', '.join(keys)}"
            problem = inner(item)
            if problem:
                return f".{key}{problem}"
        return None

    return check


_IDENT = _scalar(lambda v: isinstance(v, str) and _NAME.fullmatch(v) is not None,
                 "1-64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit")
_TEXT = _scalar(lambda v: isinstance(v, str), "a string")
_FLAG = _scalar(lambda v: isinstance(v, bool), "true or false")
_STRINGS = _scalar(lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
                   "a list of strings")
_GHZ = _number(0, 10, above=True)
_DEVICE_FIELDS: dict[str, Check] = {
    "name": _IDENT, "kind": _scalar(lambda v: v in KINDS, f"one of {', '.join(KINDS)}"),
    "backend": _IDENT, "tops": _table_of(tuple(BITS), _number(*TOPS_RANGE)),
    "memory_gbps": _number(*GBPS_RANGE), "memory_gb": _number(*MEMORY_GB_RANGE),
    "price_per_hour": _number(0, MAX_PRICE, above=True),
    "source": _TEXT, "price_source": _TEXT, "checked": _FLAG,
    # A cloud CPU instance: its peaks are its cpu_family's at `cores` and `boost_ghz`.
    "family": _IDENT, "cores": _number(1, 1e5, integer=True), "boost_ghz": _GHZ,
    # An FPGA: what its int8 peak is computed from.
    "dsp": _number(1, 1e8, integer=True), "bram18": _number(1, 1e8, integer=True),
    "clock_mhz": _number(0, 1e4, above=True),
}
_FAMILY_FIELDS: dict[str, Check] = {
    "name": _IDENT, "vendor": _TEXT, "match": _STRINGS, "absent": _STRINGS,
    "ops_per_cycle": _table_of(tuple(BITS), _number(0, 1e5, above=True)), "boost_ghz": _GHZ,
    "cache_bytes_per_cycle": _table_of(("l2", "l3"), _number(0, 1e5, above=True)),
    "source": _TEXT, "checked": _FLAG,
}
_FIELDS = {"name", "kind", "backend", "tops", "memory_gbps", "memory_gb", "price_per_hour",
           "source", "price_source", "checked"}  # the Device's own; the rest go to its `extra`


def _read_catalogue(path: Path) -> tuple[dict[str, dict], dict[str, tuple[dict, str]]]:
    """One catalogue file's checked cpu families (name -> table) and devices (name -> (table,
    where it came from)); each field is checked, a device's cross-field rules in ``_device``."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogueError(f"{path}: cannot read the device catalogue ({exc.strerror})") from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CatalogueError(f"{path}: not a TOML device catalogue ({exc})") from exc
    unknown = sorted(set(data) - {"device", "cpu_family"})
    if unknown:
        raise CatalogueError(f"{path}: unknown key {_show(unknown[0])}; a device catalogue holds "
                             "[[device]] and [[cpu_family]] tables")
    families = _entries(path, data, "cpu_family", _FAMILY_FIELDS,
                        ("match", "ops_per_cycle", "boost_ghz", "source"))
    return {name: table for name, (table, _) in families.items()}, _entries(
        path, data, "device", _DEVICE_FIELDS, ())


def _entries(path: Path, data: dict[str, Any], key: str, fields: dict[str, Check],
             required: tuple[str, ...]) -> dict[str, tuple[dict, str]]:
    tables = data.get(key, [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise CatalogueError(f"{path}: {key} must be a list of [[{key}]] tables")
    out: dict[str, tuple[dict, str]] = {}
    for i, table in enumerate(tables, 1):
        problem = _IDENT(table.get("name"))
        if problem:
            raise CatalogueError(f"{path}: [[{key}]] #{i}: name{problem}")
        where = f"{path}: {key.replace('_', ' ')} {table['name']!r}"
        if table["name"] in out:
            raise CatalogueError(f"{where}: named twice in this file")
        missing = [f for f in required if f not in table]
        if missing:
            raise CatalogueError(f"{where}: lacks {', '.join(missing)}")
        for field, value in table.items():
            check = fields.get(field)
            if check is None:
                raise CatalogueError(f"{where}: unknown field {_show(field)}; valid: {', '.join(fields)}")
            problem = check(value)
            if problem:
                raise CatalogueError(f"{where}: {field}{problem}")
        out[table["name"]] = (table, where)
    return out


def _device(entry: dict[str, Any], families: dict[str, dict], where: str) -> Device:
    """A Device from a field-checked entry: its peaks given (``tops``) or from its cpu family."""
    entry = dict(entry)
    if entry["name"] == HOST:
        raise CatalogueError(f"{where}: the name {HOST!r} is the machine advise runs on; choose another")
    if "tops" in entry and "family" in entry:
        raise CatalogueError(f"{where}: give tops or family (a CPU instance), not both")
    family = entry.get("family")
    if family is not None:
        if family not in families:
            raise CatalogueError(f"{where}: unknown cpu_family {family!r}; known: {', '.join(families)}")
        if "cores" not in entry:
            raise CatalogueError(f"{where}: lacks cores (its peaks are cores x boost_ghz x its "
                                 "cpu_family's ops_per_cycle)")
        ghz = entry.get("boost_ghz", families[family]["boost_ghz"])  # the instance's own clock
        entry["tops"] = _cpu_tops(families[family], entry["cores"], ghz)
        problem = _DEVICE_FIELDS["tops"](entry["tops"])
        if problem:
            raise CatalogueError(f"{where}: tops (from cpu_family {family!r}){problem}")
    missing = [f for f in ("kind", "tops", "memory_gbps", "memory_gb") if f not in entry]
    if missing:
        raise CatalogueError(f"{where}: lacks {', '.join(missing)}")
    entry.setdefault("price_per_hour", None)  # unpriced: ranked after the priced
    entry.setdefault("source", "")
    entry.setdefault("backend", "")
    return Device(**{k: v for k, v in entry.items() if k in _FIELDS},
                  extra={k: v for k, v in entry.items() if k not in _FIELDS})
