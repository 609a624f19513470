"""The wheel carries every file the package reads at run time (``pip install -e`` hides a miss;
``.ci/wheel-check`` builds and runs the real wheel)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_data_file_in_the_package_is_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["slimgraph"]
    package = ROOT / "slimgraph"
    shipped = {p for pattern in patterns for p in package.glob(pattern)}
    data = {p for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
            and "__pycache__" not in p.parts}
    assert data, "no data files found: the test looks in the wrong place"
    missing = sorted(str(p.relative_to(package)) for p in data - shipped)
    assert not missing, f"read at run time but not in package-data: {missing}"


def test_dependencies_name_what_import_slimgraph_needs() -> None:
    import subprocess
    import sys

    code = ("import sys, slimgraph, slimgraph.backends, slimgraph.cli; "
            "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True).stdout.split())
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {d.split("=")[0].split(">")[0].split("[")[0].strip().lower().replace("-", "_")
                for d in config["project"]["dependencies"]}
    third_party = {m for m in loaded if m not in sys.stdlib_module_names and m != "slimgraph"
                   and not m.startswith("_")}
    # what a declared dependency pulls in with it (numpy's, matplotlib's, rich's, jinja2's own
    # imports; cython_runtime is the module every Cython extension creates)
    transitive = {"cython_runtime", "markupsafe", "mpl_toolkits", "pygments", "markdown_it", "mdurl",
                  "dateutil", "six", "pyparsing", "cycler", "kiwisolver", "packaging", "PIL", "fontTools",
                  "contourpy", "typing_extensions", "google", "flatbuffers", "coloredlogs",
                  "humanfriendly", "sympy", "mpmath", "protobuf"}
    undeclared = sorted(m for m in third_party - transitive if m.lower() not in declared)
    assert not undeclared, f"imported by import slimgraph but not a dependency: {undeclared}"
