"""The package's import graph points one way (cli -> drivers -> steps -> model/io -> config), has no
cycles, and the report command runs without JAX.

    python tests/test_layers.py        # prints the import graph by layer
"""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "spin_jax")

# Highest first. A module may import modules of lower layers, and of its own layer without a cycle.
LAYERS = [
    ("cli", {"cli", "__main__"}),
    ("drivers", {"iterate", "sft", "evaluate", "benchmark", "benchmark_data", "mt_bench", "study", "report",
                 "plan"}),
    ("steps", {"sampling", "train", "scoring", "data.*"}),
    ("core", {"model.*", "loss", "io.*"}),
    ("base", {"sharding", "collectives", "rundir", "logs", "errors", "tracking", "benchmark_tasks.*"}),
    ("config", {"config", "__init__"}),
]


def layer_of(module: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if module == m or (m.endswith(".*") and (module == m[:-2] or module.startswith(m[:-1]))):
                return i
    raise AssertionError(f"spin_jax.{module} is in no layer of tests/test_layers.py: add it")


def modules() -> list[str]:
    out = []
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), PKG)[:-3].replace(os.sep, ".")
                out.append(rel[: -len(".__init__")] if rel.endswith(".__init__") and rel != "__init__" else rel)
    return sorted(out)


def imports(module: str) -> set[str]:
    """spin_jax modules that `module` imports anywhere in its file (top level or inside functions)."""
    path = os.path.join(PKG, *module.split("."))
    path = path + ".py" if os.path.exists(path + ".py") else os.path.join(path, "__init__.py")
    known = set(modules())
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("spin_jax."):
                sub = name[len("spin_jax."):]
                if sub in known:
                    out.add(sub)
    return out - {module}


def graph() -> dict[str, set[str]]:
    return {m: imports(m) for m in modules()}


def test_imports_point_down_the_layers():
    bad = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
           for m, deps in graph().items() for d in deps if layer_of(d) < layer_of(m)]
    assert not bad, "imports that point up:\n" + "\n".join(bad)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in g:
        if m not in state:
            visit(m, [m])


def test_report_command_does_not_import_jax(tmp_path):
    """`spin-jax report` reads the run directory through spin_jax.rundir only: no JAX is loaded."""
    run = tmp_path / "run"
    (run / "iter0").mkdir(parents=True)
    (run / "iter0" / "metrics.jsonl").write_text(
        "".join('{"step": %d, "loss": %g, "rewards/margins": 0.1}\n' % (s, 0.7 - 0.1 * s) for s in (1, 2, 3)))
    code = ("import sys, runpy; sys.argv = ['spin-jax', 'report', '--run', sys.argv[1]]\n"
            "try:\n    runpy.run_module('spin_jax', run_name='__main__')\n"
            "finally:\n    print('JAX_LOADED' if any(m == 'jax' or m.startswith('jax.') for m in sys.modules)"
            " else 'NO_JAX')")
    p = subprocess.run([sys.executable, "-c", code, str(run)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "NO_JAX" in p.stdout, p.stdout + p.stderr
    assert (run / "report" / "report.md").exists() and (run / "report" / "train_curves.png").exists()


if __name__ == "__main__":
    g = graph()
    for i, (name, _) in enumerate(LAYERS):
        for m in sorted(x for x in g if layer_of(x) == i):
            print(f"{name:8s} {m:22s} -> {', '.join(sorted(g[m])) or '-'}")
