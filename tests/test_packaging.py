"""setup.py's ranges hold the versions requirements.txt pins (the ones the suite runs with)."""

import ast
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def setup_requirements() -> list[Requirement]:
    call = next(node for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    specs = list(kwargs["install_requires"]) + [r for extra in kwargs["extras_require"].values() for r in extra]
    return [Requirement(s) for s in specs]


def pins() -> dict[str, str]:
    out = {}
    lines = (ROOT / "requirements.txt").read_text().splitlines() + (ROOT / "requirements-bench.txt").read_text().splitlines()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"requirements.txt pins exact versions: {line}"
            out[canonicalize_name(req.name)] = spec.version
    return out


def test_setup_ranges_hold_the_pinned_versions():
    pinned = pins()
    pinned["torch"] = "2.13.0"  # installed first by scripts/setup_env.sh, spelled exactly so
    checked = 0
    for req in setup_requirements():
        name = canonicalize_name(req.name)
        if name in pinned:
            assert req.specifier.contains(pinned[name]), f"setup.py {req} excludes the tested {name}=={pinned[name]}"
            assert req.specifier, f"setup.py {req}: give the tested range"
            checked += 1
    assert checked >= 15
    runtime = {canonicalize_name(r.name) for r in setup_requirements()}
    assert {"apache-beam", "dask", "distributed", "transformers", "pyarrow"} <= runtime
    assert {"onnxruntime", "onnx"} <= runtime  # the benchmark extra, pinned in requirements-bench.txt
