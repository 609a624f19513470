"""Outside text -> safe pieces of generated C++ / Makefile / Tcl: the one place names become code.

A name from a model file (a graph, node or value name) is data. It reaches generated code only as
- an identifier from a ``Namespace``: an allow-list mangling (``[A-Za-z][A-Za-z0-9_]*``, capped
  at ``MAX_IDENTIFIER`` characters) made unique against every name already given in that scope,
  C++'s keywords and the names the included headers and the compiler define; or
- free text through ``text()``: an allow-list of characters that cannot end a comment, a string
  literal, a Makefile or Tcl word, or splice a line (no newline, backslash, ``*``, ``/``, ``?``,
  quote, ``$``, ``#``, brace or bracket); every other byte is percent-encoded.
Option values that are written into the project are checked against a pattern (``part()``,
``clock_ns()``) and paths handed to make are checked by ``make_path()``: make expands ``$`` in a
variable given on its command line and its recipes run in a shell.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

MAX_IDENTIFIER = 48
MAX_TEXT = 160
IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


CPP_KEYWORDS = _words("""
    alignas alignof and and_eq asm auto bitand bitor bool break case catch char char8_t char16_t
    char32_t class compl concept const consteval constexpr constinit const_cast continue co_await
    co_return co_yield decltype default delete do double dynamic_cast else enum explicit export
    extern false final float for friend goto if import inline int long module mutable namespace new
    noexcept not not_eq nullptr operator or or_eq override private protected public register
    reinterpret_cast requires return short signed sizeof static static_assert static_cast struct
    switch template this thread_local throw true try typedef typeid typename union unsigned using
    virtual void volatile wchar_t while xor xor_eq
""")

# Names that the headers a generated project includes (<cstdint>, <cstdio>, <fstream>, <deque>,
# ap_int.h, hls_stream.h) or the compiler define in the global scope or as lower-case macros.
# Names without a lower-case letter are refused as a class: that is where macros live.
CPP_LIBRARY = _words("""
    main std sg hls ap_int ap_uint ap_fixed ap_ufixed ap_int_base ap_fixed_base ap_range_ref
    ap_bit_ref ap_concat_ref ap_private ssdm_int
    int8_t int16_t int32_t int64_t uint8_t uint16_t uint32_t uint64_t intptr_t uintptr_t intmax_t
    uintmax_t size_t ssize_t ptrdiff_t max_align_t nullptr_t wint_t off_t fpos_t va_list
    int_least8_t int_least16_t int_least32_t int_least64_t uint_least8_t uint_least16_t
    uint_least32_t uint_least64_t int_fast8_t int_fast16_t int_fast32_t int_fast64_t uint_fast8_t
    uint_fast16_t uint_fast32_t uint_fast64_t
    stdin stdout stderr errno assert offsetof setjmp longjmp va_arg va_start va_end va_copy
    getc putc getchar putchar unix linux i386 major minor makedev
""")


def _reserved_by_the_language(name: str) -> bool:
    """C++ keywords, library names, and macro-like names (no lower-case letter)."""
    return name in CPP_KEYWORDS or name in CPP_LIBRARY or not re.search(r"[a-z]", name)


def mangle(text: str) -> str:
    """Any text -> an identifier-shaped string: bytes outside ``[A-Za-z0-9]`` become ``_`` (runs
    collapse, none at either end, so never a reserved ``_X`` or ``__``), a leading digit or an
    empty result gets a ``v`` prefix, and the length is capped."""
    cleaned = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")
    if not cleaned or cleaned[0].isdigit():
        cleaned = f"v_{cleaned}".rstrip("_")
    return cleaned[:MAX_IDENTIFIER].rstrip("_")


class Namespace:
    """The identifiers of one generated scope, each unique against every other and the reserved.

    ``ident(key, role, hint)`` gives the same identifier for the same (role, key) and a fresh one
    for anything else, mangled from ``hint`` (default: the key); a clash is resolved by the lowest
    free ``_2``, ``_3``, ... in the order asked, so the same graph always gets the same names.
    """

    def __init__(self, reserved: Iterable[str] = ()) -> None:
        self.taken: set[str] = set()
        self.given: dict[tuple[str, str], str] = {}
        for name in reserved:
            if not IDENTIFIER.match(name):
                raise ValueError(f"reserved name {name!r} is not an identifier")
            self.taken.add(name)

    def ident(self, key: str, role: str = "value", hint: str | None = None) -> str:
        if (role, key) in self.given:
            return self.given[role, key]
        base = mangle(key if hint is None else hint)
        if not re.search(r"[a-z]", base):  # macro-like: no numeric suffix could make it safe
            base = f"v_{base}"[:MAX_IDENTIFIER]
        name, n = base, 1
        while name in self.taken or _reserved_by_the_language(name):
            n += 1
            name = f"{base[:MAX_IDENTIFIER - len(str(n)) - 1]}_{n}"
        self.taken.add(name)
        self.given[role, key] = name
        return name


_TEXT_SAFE = re.compile(r"[A-Za-z0-9 _.,:=+()<>@-]")


def text(value: object) -> str:
    """Free text for a comment or string literal in C++, Makefile or Tcl: characters outside a
    small allow-list (newlines, ``\\``, ``*``, ``/``, ``?``, quotes, ``$``, ``#``, ``%``, braces,
    brackets, non-ASCII) are percent-encoded byte by byte (``%0A``); capped at ``MAX_TEXT``."""
    out = []
    for char in str(value):
        if _TEXT_SAFE.match(char):
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    joined = "".join(out)
    return joined if len(joined) <= MAX_TEXT else joined[:MAX_TEXT - 3] + "..."


PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
MAX_CLOCK_NS = 1000.0  # 1 MHz: slower than any clock an FPGA design is built for


def part(value: object) -> str:
    """An FPGA part number (``xcvu13p-flga2577-2-e``): letters, digits, ``-_.``, at most 64."""
    if not isinstance(value, str) or not PART.match(value):
        raise ValueError(f"part={value!r} is not a part number (letters, digits, '-', '_', '.')")
    return value


def clock_ns(value: object) -> float:
    """A clock period in ns: a finite number in (0, MAX_CLOCK_NS]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0 < value <= MAX_CLOCK_NS:
        raise ValueError(f"clock_ns={value!r} must be a number > 0 and <= {MAX_CLOCK_NS:g}")
    return float(value)


MAKE_PATH = re.compile(r"/[A-Za-z0-9_./+-]*\Z")


def make_path(path: Path) -> str:
    """An existing absolute path, as text make and the shell of its recipes take literally."""
    resolved = path.resolve()
    if not resolved.exists():
        raise ValueError(f"{path} does not exist")
    if not MAKE_PATH.match(str(resolved)):
        raise ValueError(f"{resolved} holds characters that make or a shell would interpret "
                         "(allowed: letters, digits, '/', '.', '_', '+', '-')")
    return str(resolved)


__all__ = ["CPP_KEYWORDS", "MAX_IDENTIFIER", "Namespace", "clock_ns", "make_path", "mangle", "part",
           "text"]
