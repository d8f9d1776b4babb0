"""dvc.yaml's deps cannot go stale: every project file a stage's script imports is a dep of that stage, and every
code dep is a file it imports (or a folder holding one).

DVC re-runs a stage only when one of its deps changes, so a module the stage imports but does not list is a change
that `dvc repro` silently skips. This test follows each stage's `python stages/X.py` through the project's own
imports (module-level and inside functions, relative ones resolved; a package's `__init__.py` comes with each of its
submodules) and checks that each file reached is a dep, or lies in a folder that is. It follows `import` statements
only: a module loaded by name at run time (`importlib.import_module`) is not seen, so its folder must be a dep
by hand (as `chatforge/sources` is for collect). Imports under `if TYPE_CHECKING:` are not run, so not followed.

The lists stay hand-written in dvc.yaml (the pipeline's map, read by people) rather than generated; this test is
what keeps them exact, naming each file to add or remove.
"""
from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def module_file(module: str, root: Path) -> Path | None:
    """The project file of a dotted module name (`a/b.py` or `a/b/__init__.py`), or None where it is not ours."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(path: Path, root: Path) -> set[str]:
    """The dotted names that the file's import statements, at any depth, bring in (`from m import n`: m.n and m)."""
    package = module_name(path, root) if path.name == "__init__.py" else module_name(path, root).rpartition(".")[0]
    names, todo = set(), [ast.parse(path.read_text(), str(path))]
    while todo:
        node = todo.pop()
        if is_type_checking(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package, one level up per extra dot
                anchor = package.split(".")[: package.count(".") + 2 - node.level]
                base = ".".join(anchor + [base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_closure(script: Path, root: Path) -> set[Path]:
    """The script and every project file that importing it runs, transitively."""
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path, root):
            parts = name.split(".")
            # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            for depth in range(1, len(parts) + 1):
                found = module_file(".".join(parts[:depth]), root)
                if found is not None and found not in seen:
                    todo.append(found)
    return seen


def stage_scripts(cmd: str | list[str]) -> list[str]:
    """The `.py` files a stage's command runs with python (`python stages/x.py ${item.model}`)."""
    scripts = []
    for line in [cmd] if isinstance(cmd, str) else cmd:
        words = shlex.split(line)
        scripts += [word for previous, word in zip(words, words[1:])
                    if re.fullmatch(r"python3?(\.\d+)?", Path(previous).name) and word.endswith(".py")]
    return scripts


def stage_deps(dvc_yaml: Path) -> dict[str, tuple[list[Path], set[Path]]]:
    """Per stage, (its deps as paths, the project files its scripts import, the scripts included)."""
    root, stages = dvc_yaml.parent.resolve(), {}
    for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        stage = stage.get("do", stage)  # foreach stages keep their body under `do`; matrix stages do not
        deps = [dep if isinstance(dep, str) else next(iter(dep)) for dep in stage.get("deps", [])]
        needed = set()
        for script in stage_scripts(stage["cmd"]):
            needed |= import_closure(root / script, root)
        stages[name] = [root / dep for dep in deps if "${" not in dep], needed
    return stages


def covers(dep: Path, path: Path) -> bool:
    return path == dep or dep in path.parents


def missing_deps(dvc_yaml: Path) -> dict[str, list[str]]:
    """Per stage, the imported project files (and the script itself) that no dep of the stage covers."""
    root, missing = dvc_yaml.parent.resolve(), {}
    for name, (deps, needed) in stage_deps(dvc_yaml).items():
        uncovered = sorted(str(path.relative_to(root)) for path in needed if not any(covers(dep, path) for dep in deps))
        if uncovered:
            missing[name] = uncovered
    return missing


def unneeded_deps(dvc_yaml: Path, code_dirs: tuple[str, ...] = ("chatforge", "stages")) -> dict[str, list[str]]:
    """Per stage, the code deps (under `code_dirs`) that hold no file the stage imports: a dep that only makes
    `dvc repro` re-run the stage for nothing, often a module that moved."""
    root, unneeded = dvc_yaml.parent.resolve(), {}
    for name, (deps, needed) in stage_deps(dvc_yaml).items():
        code = [dep for dep in deps if dep.relative_to(root).parts[0] in code_dirs]
        stale = sorted(str(dep.relative_to(root)) for dep in code if not any(covers(dep, path) for path in needed))
        if stale:
            unneeded[name] = stale
    return unneeded


def listing(by_stage: dict[str, list[str]]) -> str:
    return "\n".join(f"  {stage}:\n" + "\n".join(f"    - {path}" for path in paths) for stage, paths in by_stage.items())


def test_every_imported_module_is_a_dep_of_its_stage():
    missing = missing_deps(ROOT / "dvc.yaml")
    if missing:
        pytest.fail("dvc.yaml: these stages import project files that are not in their deps, so `dvc repro` would "
                    "not re-run them when those files change. Add each file (or a folder holding it) to the "
                    f"stage's deps in dvc.yaml:\n{listing(missing)}", pytrace=False)


def test_every_code_dep_is_imported_by_its_stage():
    unneeded = unneeded_deps(ROOT / "dvc.yaml")
    if unneeded:
        pytest.fail("dvc.yaml: these code deps hold nothing the stage imports, so changing them re-runs the stage "
                    f"for nothing. Remove them from the stage's deps in dvc.yaml:\n{listing(unneeded)}", pytrace=False)


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_import_walker_follows_function_level_relative_and_package_imports(tmp_path):
    write(tmp_path, {
        "run.py": "import os\nfrom pkg import a\n",
        "pkg/__init__.py": "",
        "pkg/a.py": "def later():\n    from pkg.sub import c\n    return c\n",
        "pkg/sub/__init__.py": "from . import helper\n",
        "pkg/sub/helper.py": "",
        "pkg/sub/c.py": "from ..b import value\n",
        "pkg/b.py": "from typing import TYPE_CHECKING\nvalue = 1\nif TYPE_CHECKING:\n    from pkg import unused\n",
        "pkg/unused.py": "",
        "pkg/never.py": "",
    })
    found = {str(path.relative_to(tmp_path)) for path in import_closure(tmp_path / "run.py", tmp_path)}
    assert found == {"run.py", "pkg/__init__.py", "pkg/a.py", "pkg/sub/__init__.py", "pkg/sub/helper.py",
                     "pkg/sub/c.py", "pkg/b.py"}


def test_missing_deps_reads_matrix_stages_and_folder_deps(tmp_path):
    write(tmp_path, {
        "stages/s.py": "from pkg import a\n",
        "pkg/__init__.py": "",
        "pkg/a.py": "import pkg.b\n",
        "pkg/b.py": "",
        "dvc.yaml": yaml.safe_dump({"stages": {
            "covered": {"cmd": "python stages/s.py", "deps": ["stages/s.py", "pkg"]},
            "each": {"matrix": {"m": ["x", "y"]}, "cmd": "python stages/s.py ${item.m}",
                     "deps": ["pkg/a.py", "data/${item.m}"]},
        }}),
    })
    assert missing_deps(tmp_path / "dvc.yaml") == {"each": ["pkg/__init__.py", "pkg/b.py", "stages/s.py"]}
    assert unneeded_deps(tmp_path / "dvc.yaml", code_dirs=("pkg", "stages")) == {}


def test_unneeded_deps_names_a_module_the_stage_no_longer_imports(tmp_path):
    write(tmp_path, {
        "stages/s.py": "import pkg.a\n",
        "pkg/__init__.py": "",
        "pkg/a.py": "",
        "pkg/moved.py": "",
        "other/x.py": "",
        "dvc.yaml": yaml.safe_dump({"stages": {"s": {"cmd": "python stages/s.py", "deps": [
            "stages/s.py", "pkg/__init__.py", "pkg/a.py", "pkg/moved.py", "other", "data.txt"]}}}),
    })
    assert unneeded_deps(tmp_path / "dvc.yaml", code_dirs=("pkg", "stages", "other")) == {
        "s": ["other", "pkg/moved.py"]}
