"""The package's shape: imports run one way (no cycle, also through imports inside functions), modules
stay small, the version is written once."""
import ast
import pathlib
import re

PKG = pathlib.Path(__file__).resolve().parent.parent / "sparseadapter_kernels"
ROOT = PKG.parent
MAX_LINES = 500
# Kernels are allowed to be long (one file per kernel, its launch code beside it).
KERNEL_FILES = {"triton/fused_adapter.py", "triton/bsr_linear.py"}


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: pathlib.Path) -> set:
    """Package modules imported anywhere in ``path`` (top level and inside functions)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names] + [target]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            if n.startswith("sparseadapter_kernels"):
                found.add(n)
    return found


def graph() -> dict:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    g = {}
    for name, path in files.items():
        deps = set()
        for imp in imports_of(path):
            # the longest module that the import names (``from . import ops`` names the module ops)
            while imp and imp not in files:
                imp = imp.rsplit(".", 1)[0] if "." in imp else ""
            if imp and imp != name and not name.startswith(imp + "."):  # a package's own __init__ is not a cycle
                deps.add(imp)
        g[name] = deps
    return g


def find_cycle(g: dict):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if m == "sparseadapter_kernels":  # the package's namespace (examples import it whole)
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_modules_stay_small():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES and str(p.relative_to(PKG)) not in KERNEL_FILES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


def test_version_written_once():
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    from sparseadapter_kernels._version import __version__

    assert __version__ == declared
    hits = [str(p.relative_to(ROOT)) for p in PKG.rglob("*.py") if "__version__ = " in p.read_text()]
    assert hits == ["sparseadapter_kernels/_version.py"], hits
