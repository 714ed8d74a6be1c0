"""The code's layout: the top level holds the reference and the scripts that run it, lab/ the
research tooling built on them. Imports flow one way (lab/ may import the top level, never the
reverse; no circle), no file imports an entry-point script, every import is at the top of its
file, and each file is short enough to read in one sitting."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train_pretrain", "train_downstream", "bench",
           "lab.analysis", "lab.experiments", "lab.bench_data", "lab.bench_extra"}
# lab.bench_extra extends the efficiency benchmark with its own measurements, by its instruments
EXTENDS = {"lab.bench_extra": {"bench"}}


def project_files():
    """{module name: path} of the top-level modules ("model") and of lab's ("lab.analysis"; its
    __init__.py is the package "lab")."""
    files = {}
    for folder, prefix in [(ROOT, ""), (os.path.join(ROOT, "lab"), "lab.")]:
        for f in sorted(os.listdir(folder)):
            if f.endswith(".py"):
                name = prefix + f[:-3] if f != "__init__.py" else prefix.rstrip(".")
                files[name] = os.path.join(folder, f)
    return files


def imported(node, ours):
    """The project modules an import statement names: `from lab import probes` names lab.probes,
    `import lab.probes as p` and `from lab.probes import x` too."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in ours else node.module
                 for a in node.names]
    else:
        return set()
    found = set()
    for name in names:
        # the longest prefix that is ours: lab.probes of `import lab.probes`, none of torch.nn
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in ours:
                found.add(".".join(parts[:i]))
                break
    return found


def imports(path, ours):
    """(project imports at the top of the file, project imports anywhere below it)."""
    tree = ast.parse(open(path).read())
    top, nested = set(), set()
    for node in ast.walk(tree):
        (top if node in tree.body else nested).update(imported(node, ours))
    return top, nested


def has_main(path):
    """Whether the file ends in `if __name__ == "__main__":`, i.e. it is run as a script."""
    tree = ast.parse(open(path).read())
    return any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)


def test_imports_name_modules_inside_lab():
    ours = project_files()
    source = ("from lab import probes\nimport lab.bench_data as b\n"
              "from lab.experiments import run\nfrom model import ELIPModel\nimport torch.nn\n"
              "import eval as evaluation\n")
    found = set().union(*(imported(node, ours) for node in ast.parse(source).body))
    assert found == {"lab.probes", "lab.bench_data", "lab.experiments", "model", "eval"}


def test_scripts_are_the_files_run_as_scripts():
    files = project_files()
    assert {name for name, path in files.items() if has_main(path)} == SCRIPTS


def test_imports_flow_one_way_and_no_script_is_imported():
    files = project_files()
    graph = {}
    for name, path in files.items():
        top, nested = imports(path, files)
        assert not nested, f"{name} imports {nested} inside a function"
        scripts = top & SCRIPTS - EXTENDS.get(name, set())
        assert not scripts, f"{name} imports the script(s) {scripts}"
        if not name.startswith("lab"):
            lab = {m for m in top if m == "lab" or m.startswith("lab.")}
            assert not lab, f"{name} (top level) imports {lab}: lab/ builds on the reference"
        graph[name] = top
    # depth-first search for a cycle
    state = {}

    def visit(n, path):
        if state.get(n) == "done":
            return
        assert state.get(n) != "open", "import circle: " + " -> ".join(path + [n])
        state[n] = "open"
        for m in graph[n]:
            visit(m, path + [n])
        state[n] = "done"

    for n in graph:
        visit(n, [])
    assert graph["pruning"] == set(), "pruning.py imports nothing from the project"


def test_files_are_short_enough_to_read_in_one_sitting():
    files = project_files()
    assert "model" in files and "lab.analysis" in files
    for name, path in files.items():
        n = sum(1 for _ in open(path))
        assert n <= 600, f"{os.path.relpath(path, ROOT)} has {n} lines"


def test_no_function_is_longer_than_80_lines():
    for name, path in project_files().items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                assert n <= 80, f"{name}.{node.name} has {n} lines"
