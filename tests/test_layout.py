"""The code's layout: imports flow one way (no circle), no file imports an entry-point script,
every import at the top of its file, and each file short enough to read in one sitting."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train_pretrain", "train_downstream", "bench", "bench_data", "analysis", "experiments"}


def project_modules():
    return {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}


def imports(name, ours):
    """(top-level project imports, project imports inside functions) of ROOT/name.py."""
    tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
    top, nested = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found = {node.module.split(".")[0]}
        else:
            continue
        (top if node in tree.body else nested).update(found & ours)
    return top, nested


def test_imports_flow_one_way_and_no_script_is_imported():
    ours = project_modules()
    graph = {}
    for name in ours:
        top, nested = imports(name, ours)
        assert not nested, f"{name}.py imports {nested} inside a function"
        assert not top & SCRIPTS, f"{name}.py imports the script(s) {top & SCRIPTS}"
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
    for name in project_modules():
        n = sum(1 for _ in open(os.path.join(ROOT, name + ".py")))
        assert n <= 600, f"{name}.py has {n} lines"
