"""The package's shape, held by tests: imports point one way (no cycle, counting imports inside
functions), the training engine never names a task family, and every knob is declared once (the
command line, config.json and --print-config all come from goat_lora.settings.RunSettings)."""

from __future__ import annotations

import ast
import json
import os

import pytest

import goat_lora

PACKAGE = os.path.dirname(goat_lora.__file__)


def _modules() -> dict[str, str]:
    """Dotted module name (goat_lora.x.y) -> file path, for every .py file of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                relative = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                found[relative.removesuffix(".__init__")] = path
    return found


def _imports(module: str, path: str, known: dict[str, str]) -> set[str]:
    """The package modules `module` imports anywhere in its file (top level or inside functions)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):  # its own package is no cycle
                targets.add(name)
    return targets


def test_no_private_name_crosses_a_module():
    """`from .x import _y` is refused: a name with a leading underscore is its module's own business.
    What another module needs is public there (e.g. tasks.tables.rdataset, layer.in_backward_recompute)."""
    crossings = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("goat_lora")):
                crossings += [f"{module}: from {'.' * node.level}{node.module or ''} import {alias.name}"
                              for alias in node.names if alias.name.startswith("_") and alias.name != "__version__"]  # fmt: skip
    assert not crossings, crossings


def test_no_import_cycles():
    known = _modules()
    graph = {module: _imports(module, path, known) for module, path in known.items()}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = trail[trail.index(target):] + [target] if target in trail else [module, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The checker itself: two modules importing each other inside functions are reported."""
    (tmp_path / "goat_lora").mkdir()
    (tmp_path / "goat_lora" / "__init__.py").write_text("")
    (tmp_path / "goat_lora" / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "goat_lora" / "b.py").write_text("def g():\n    from . import a\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", str(tmp_path / "goat_lora"))
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()


def test_the_engine_never_names_a_task_family():
    """The engine reaches the families only through the registry (tasks.get_task): it imports no
    family module and holds no family name."""
    from goat_lora.tasks import TASKS

    families = {module for module in _modules() if module.startswith("goat_lora.tasks.")} - {
        "goat_lora.tasks.base", "goat_lora.tasks"}  # fmt: skip
    known = _modules()
    for module, path in known.items():
        if not module.startswith("goat_lora.engine"):
            continue
        assert not _imports(module, path, known) & families, f"{module} imports a task family"
        strings = {node.value for node in ast.walk(ast.parse(open(path, encoding="utf-8").read()))
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)}  # fmt: skip
        assert not strings & set(TASKS), f"{module} names a family: {strings & set(TASKS)}"


def test_every_knob_is_declared_once():
    """Each RunSettings field is a flag of the commands it lists, generated from its declaration:
    cli.py itself declares none of them."""
    from goat_lora.cli import build_parser
    from goat_lora.settings import RunSettings, flag, knob_fields

    cli_source = open(os.path.join(PACKAGE, "cli.py"), encoding="utf-8").read()
    parser = build_parser(["train"])
    commands = parser._subparsers._group_actions[0].choices
    for name, spec in knob_fields().items():
        assert f'"{flag(name)}"' not in cli_source, f"cli.py declares {flag(name)} by hand"
        for command in spec.metadata["commands"]:
            options = {o for action in commands[command]._actions for o in action.option_strings}
            assert flag(name) in options, f"goat {command} lacks {flag(name)}"
    # and config.json / --print-config use the same names
    assert set(RunSettings().to_dict()) == set(knob_fields())


def test_print_config_resolves_without_loading_a_model(capsys, monkeypatch):
    from goat_lora import hf
    from goat_lora.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("--print-config loaded a model")

    for name in ("load_sequence_classifier", "load_causal_lm", "load_tokenizer", "load_image_classifier"):
        monkeypatch.setattr(hf, name, refuse)
    assert main(["train", "--task", "regression", "--rank", "16", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["task"] == "regression" and printed["rank"] == 16 and printed["lora_alpha"] == 32.0
    assert printed["data"] == "tate" and printed["metric"] == "pearson" and printed["lr"] == 3e-4


def test_config_file_then_flags(tmp_path, capsys):
    """--config FILE is the base; flags given beside it win."""
    from goat_lora.cli import main

    (tmp_path / "c.json").write_text(json.dumps({"args": {"rank": 4, "experts": 4, "epochs": 3}}))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--epochs", "2", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["rank"], printed["experts"], printed["epochs"]) == (4, 4, 2)
