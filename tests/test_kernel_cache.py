"""The kernels' structure: no import circle in the package, and cache keys that cover every
source a compiled kernel binds (numba's own on-disk cache notices edits to the file that
defines the kernel's code, nothing else: a helper edited elsewhere would load a stale
kernel)."""
import ast
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
# import package -> its folder (setup.py's package_dir)
PACKAGES = {"fusedopt": ROOT / "fusedopt", "fusedopt.kernels": ROOT / "kernels"}


def _modules():
    """Every module of the package: dotted name -> (path, whether it is a package)."""
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.glob("*.py"):
            init = path.name == "__init__.py"
            mods[pkg if init else f"{pkg}.{path.stem}"] = (path, init)
    return mods


def import_graph():
    """module -> the package's modules it imports anywhere in its code (lazy imports inside
    functions included: they close a circle as surely when they run), from the AST."""
    mods = _modules()
    graph = {}
    for name, (path, init) in mods.items():
        here = name if init else name.rpartition(".")[0]  # what "." means in this module
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = (f"{base}.{node.module}" if node.module else base) if node.level \
                    else node.module
                # `from m import x`: the submodule m.x where there is one, else m itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in mods and t != name)
        graph[name] = deps
    return graph


def find_cycle(graph):
    """One circle of imports as a list of modules (first == last), or None."""
    state = {}  # 1: on the current path, 2: done

    def visit(n, path):
        state[n] = 1
        path.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d, path)
                if found:
                    return found
        state[n] = 2
        path.pop()
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n, [])
            if found:
                return found
    return None


def test_the_graph_sees_the_kernels_and_their_lazy_imports():
    g = import_graph()
    assert "fusedopt.kernels.numba_engine" in g["fusedopt.bucket"]  # (inside a function)
    assert "fusedopt.kernels.rules" in g["fusedopt.kernels.numba_base"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


# -- the Numba kernels' on-disk cache keys ---------------------------------------------------

def _flags():
    from fusedopt.kernels import rules
    return tuple(sorted((f, False) for f in rules.FLAGS))


def _names(monkeypatch):
    """The on-disk name (qualname, which holds the cache key) of one variant of each Numba
    kernel family, from the builds themselves: numba_base.compile_kernel records it and
    compiles nothing."""
    from fusedopt.kernels import numba_base, numba_engine, numba_matrix
    from fusedopt.kernels.flags import Codes, Matrix, Update
    names = {}
    family = [None]

    def record(proto, gl, name, **options):
        names[family[0]] = name
        return lambda *args: None

    monkeypatch.setattr(numba_base, "compile_kernel", record)
    monkeypatch.setattr(numba_base, "kernels", {})
    numba_base.source_hash.cache_clear()
    f32 = ("float32", "float32")
    family[0] = "update"
    tables = (None, None, [None] * 7, *[None] * 7)  # P, G, S, C, R, TID, CS, CE, N, Q
    numba_engine.run("adam", _flags(), f32, int(Update.A | Update.B), *tables)
    family[0] = "8-bit"
    numba_engine.run("adam", _flags(), f32, int(Update.A | Update.B | Codes.A | Codes.B), *tables)
    family[0] = "norm"
    numba_engine.norm_partials("bfloat16", 2.0, None, [], None, None, None)
    family[0] = "matrix"
    numba_matrix.run_matrix("adafactor", _flags(), f32, int(Matrix.SLOTS), None, None, [None] * 3,
                            *[None] * 10)
    numba_base.source_hash.cache_clear()
    return names


KERNELS = ("numba_base", "rules", "numba_ops", "coefficients", "flags")  # what every one binds
BINDS = {
    "update": {"numba_engine", *KERNELS},
    "norm": {"numba_engine", *KERNELS},
    "8-bit": {"numba_quant", "qmap", *KERNELS},
    "matrix": {"numba_matrix", *KERNELS},
}


def _module_names():
    return sorted(p.stem for p in PACKAGES["fusedopt.kernels"].glob("*.py"))


@pytest.mark.parametrize("edited", _module_names())
def test_editing_a_source_renames_every_kernel_that_binds_it(edited, monkeypatch):
    """An edit to a module's source changes the cache key of every kernel family that binds
    anything of it (numba_base's converters reach the matrix kernel too), and leaves the
    keys of the families that bind nothing of it alone (the Triton modules reach none)."""
    from fusedopt.kernels import numba_base
    before = _names(monkeypatch)
    assert set(before) == set(BINDS)
    read = numba_base._source
    monkeypatch.setattr(numba_base, "_source", lambda name: read(name) + "\n# an edit\n"
                        if name == ("" if edited == "__init__" else edited) else read(name))
    after = _names(monkeypatch)
    for fam, binds in BINDS.items():
        if edited in binds:
            assert after[fam] != before[fam], f"editing {edited}.py keeps {fam}'s kernels"
        if edited.startswith("triton") or edited in ("roofline", "__init__"):
            assert after[fam] == before[fam], f"editing {edited}.py renames {fam}'s kernels"


def test_a_helper_edit_reaches_the_matrix_kernel(monkeypatch):
    """The issue's case: f32_to_bf16 (numba_base) changed; every kernel, the matrix one
    included, gets a new key."""
    from fusedopt.kernels import numba_base
    before = _names(monkeypatch)
    read = numba_base._source
    edit = ("return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)",
            "return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16) ")
    assert edit[0] in read("numba_base")
    monkeypatch.setattr(numba_base, "_source", lambda name: read(name).replace(*edit))
    after = _names(monkeypatch)
    assert all(after[f] != before[f] for f in BINDS)


def test_keys_tell_variants_apart(monkeypatch):
    from fusedopt.kernels import numba_base
    key = numba_base.cache_key("numba_engine", "adam", 1)
    assert key & 1 and key != numba_base.cache_key("numba_engine", "adam", 2)
    assert numba_base.cache_key("fusedopt.kernels.numba_engine", "adam", 1) == key
    monkeypatch.setattr(numba_base, "PARALLEL", [False])  # (a forked child: serial kernels)
    assert numba_base.cache_key("numba_engine", "adam", 1) != key


def test_a_variant_binds_only_names_its_module_declares():
    from fusedopt.kernels import numba_base, numba_engine
    gl = numba_base.variant_globals(vars(numba_engine), {"rule": 1, "SCALE_GRAD": True})
    assert gl["rule"] == 1 and gl["SCALE_GRAD"] and numba_engine.rule is None
    with pytest.raises(NameError, match="REDUCE"):
        numba_base.variant_globals(vars(numba_engine), {"REDUCE": True})


def test_each_parity_case_runs_one_kernel_variant():
    """Maximize, weight decay and the lerp formula are values, not flags: the four groups of
    a parity case (maximize x weight decay, different betas) share one flag set, so one
    compiled variant per case and dtype (832 variants over the matrix when they were flags).
    A flag that groups differ in fails here before it multiplies the first-step compiles."""
    import inspect

    import fusedopt
    from fusedopt import parity
    split = []
    for name, case, dtype in parity.matrix():
        groups = parity.groups_for(name, case, dtype)
        pg = [dict(params=[torch.nn.Parameter(p) for p in parity.make_data(0, dtype, 0, s)[0]],
                   **hp) for s, hp in groups]
        cls = getattr(fusedopt, name)
        kw = {"lr": pg[0]["lr"]} \
            if inspect.signature(cls).parameters["lr"].default is inspect.Parameter.empty else {}
        opt = cls(pg, **kw)
        flags = {opt._all_flags(g) for g in opt.param_groups}
        if len(flags) > 1:
            split.append((name, parity.case_id(case), str(dtype), len(flags)))
    assert not split, split
