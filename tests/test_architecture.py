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
                crossings += [
                    f"{module}: from {'.' * node.level}{node.module or ''} import {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and alias.name != "__version__"
                ]
    assert not crossings, crossings


def test_no_import_cycles():
    known = _modules()
    graph = {module: _imports(module, path, known) for module, path in known.items()}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = trail[trail.index(target) :] + [target] if target in trail else [module, target]
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
        "goat_lora.tasks.base",
        "goat_lora.tasks",
    }
    known = _modules()
    for module, path in known.items():
        if not module.startswith("goat_lora.engine"):
            continue
        assert not _imports(module, path, known) & families, f"{module} imports a task family"
        strings = {
            node.value
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
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
    assert printed["task"] == "regression" and printed["r"] == 16 and printed["lora_alpha"] == 32.0
    assert printed["data"] == "tate" and printed["metric"] == "pearson"
    # GOAT's rate follows from LoRA's default once the model is built (the rate rule): none printed yet
    assert printed["lr"] is None and printed["lr_from_lora"] == 1e-3


def test_config_file_then_flags(tmp_path, capsys):
    """--config FILE is the base; flags given beside it win."""
    from goat_lora.cli import main

    (tmp_path / "c.json").write_text(json.dumps({"args": {"rank": 4, "experts": 4, "epochs": 3}}))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--epochs", "2", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["r"], printed["num_experts"], printed["epochs"]) == (4, 4, 2)


# ---- one vocabulary for a run and its adapter -----------------------------------------------------
def test_the_adapter_knobs_are_goat_config_fields_with_its_defaults():
    """A run's adapter knobs carry GoatConfig's names; their defaults are GoatConfig's, except the ones
    the method chooses (None until resolved)."""
    import dataclasses

    from goat_lora.config import GoatConfig
    from goat_lora.settings import RunSettings, adapter_knobs, knob_fields

    goat = {f.name: f.default for f in dataclasses.fields(GoatConfig)}
    knobs = adapter_knobs()
    assert {
        "r",
        "num_experts",
        "top_k",
        "routing",
        "dropout",
        "lora_alpha",
        "scaling",
        "init",
        "eta",
        "rho",
        "init_cof",
        "aux_loss_coef",
        "quantize",
        "seed",
    } <= set(knobs)
    chosen_by_the_method = {"lora_alpha", "scaling", "init"}
    for name in knobs:
        assert name in goat
        assert knob_fields()[name].default == (None if name in chosen_by_the_method else goat[name]), name
    assert "rank" not in RunSettings().to_dict() and "experts" not in RunSettings().to_dict()


def test_a_goat_run_builds_its_adapter_config_from_every_knob_by_name():
    """No hand copy: change any adapter knob of a resolved run and the built GoatConfig changes with it."""
    from goat_lora.engine import resolve_run
    from goat_lora.methods import goat_config_for
    from goat_lora.settings import RunSettings, adapter_knobs

    base = resolve_run(RunSettings(r=8, num_experts=4, top_k=2)).settings
    changed = {
        "r": 16,
        "num_experts": 8,
        "top_k": 1,
        "routing": "shared",
        "top_p": 0.5,
        "dropout": 0.1,
        "lora_alpha": 7.0,
        "scaling": "rslora",
        "init": "minor",
        "eta": 0.5,
        "rho": 4.0,
        "init_cof": 0.3,
        "aux_loss_coef": 0.02,
        "quantize": "nf4",
        "seed": 5,
    }
    assert set(changed) == set(adapter_knobs()), "a new adapter knob needs a value here"
    for name, value in changed.items():
        config = goat_config_for("goat", base.replace(**{name: value}), ["q"], [])
        assert getattr(config, name) == value, name
    assert goat_config_for("goat_s", base, ["q"], []).per_expert_scaling is True


def test_adapter_rules_come_from_goat_config_in_the_flags_words():
    """The rank / experts / top-k rules live in GoatConfig.validate; a run reports them as flags."""
    from goat_lora.engine import resolve_run
    from goat_lora.settings import RunSettings

    with pytest.raises(ValueError, match=r"^--rank 6 must be divisible by --experts 4"):
        resolve_run(RunSettings(r=6, num_experts=4))
    with pytest.raises(ValueError, match=r"^--top-k 4 with --routing 'shared' must be between 1 and"):
        resolve_run(RunSettings(r=8, num_experts=4, top_k=4, routing="shared"))
    with pytest.raises(ValueError, match=r"^--dropout 1.0 must be in \[0, 1\)"):
        resolve_run(RunSettings(method="lora", dropout=1.0))  # other adapters: their knobs by the same rules
    assert resolve_run(RunSettings(method="lora", r=12, num_experts=8)).settings.r == 12  # one LoRA: any rank
    resolve_config = open(os.path.join(PACKAGE, "engine", "resolve.py"), encoding="utf-8").read()
    assert "divisible" not in resolve_config and "top_k >" not in resolve_config


def test_precedence_knob_default_family_method_config_recipe_flags(tmp_path):
    """knob default < task family < method < --config < --recipe < flags, applied by one function."""
    from goat_lora.engine import resolve_run
    from goat_lora.settings import RunSettings

    config = tmp_path / "c.json"
    config.write_text(json.dumps({"args": {"epochs": 3, "lr": 5e-4, "max_length": 40}}))
    plain = resolve_run().settings
    # family (epochs from the data's size, decided when it is loaded), method (GOAT's rate from LoRA's), knob default
    assert (plain.epochs, plain.lr, plain.lr_from_lora, plain.eval_batch_size) == (None, None, 1e-3, 64)
    assert resolve_run(RunSettings(method="lora")).settings.lr == 1e-3
    from_config = resolve_run(config=str(config)).settings
    assert (from_config.epochs, from_config.lr, from_config.max_length) == (3, 5e-4, 40)  # config over both
    recipe = resolve_run(config=str(config), flags={"recipe": "paper-glue", "data_config": "mrpc"}).settings
    assert (recipe.epochs, recipe.lr, recipe.max_length) == (10, 1e-4, 128)  # the recipe over the config
    flags = resolve_run(config=str(config), flags={"recipe": "paper-glue", "data_config": "mrpc", "epochs": 2}).settings
    assert (flags.epochs, flags.lr) == (2, 1e-4)  # flags over everything
    # one way to give the rate per level: --lr-from-lora on the command line over the recipe's lr
    ruled = resolve_run(config=str(config), flags={"recipe": "paper-glue", "data_config": "mrpc", "lr_from_lora": 2e-3})
    assert (ruled.settings.lr, ruled.settings.lr_from_lora) == (None, 2e-3)
    assert resolve_run(RunSettings(method="molora")).settings.scaling == "alpha"  # the method's preset
    assert resolve_run(RunSettings(method="molora", scaling="goat")).settings.scaling == "goat"


def test_the_family_and_the_method_fill_only_knobs_that_default_to_none():
    """So a knob with a default is never silently changed by them: the order above holds for every knob."""
    from goat_lora.methods import METHODS, method_defaults
    from goat_lora.settings import RunSettings, knob_fields
    from goat_lora.tasks import TASKS, get_task

    filled = set()
    for task in TASKS:
        filled |= set(get_task(task).defaults(RunSettings(task=task)))
    for method in METHODS:
        filled |= set(method_defaults(RunSettings(method=method)))
    assert filled and all(knob_fields()[name].default is None for name in filled), filled


def test_no_function_of_the_engine_takes_more_than_six_parameters():
    for name in sorted(os.listdir(os.path.join(PACKAGE, "engine"))):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(PACKAGE, "engine", name), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
                count = len([p for p in params if p.arg not in ("self", "cls")])
                assert count <= 6, f"engine/{name}: {node.name} takes {count} parameters"


def test_settings_saved_with_the_old_names_still_load():
    """config.json "args" and --config files written before the rename: rank -> r, experts -> num_experts."""
    from goat_lora.settings import RunSettings

    old = RunSettings.from_dict({"rank": 4, "experts": 2, "top_k": 1}, "test")
    assert (old.r, old.num_experts, old.top_k) == (4, 2, 1)


def test_the_code_is_as_the_formatter_writes_it():
    """`ruff format` (pyproject.toml: 120 columns) leaves every file as it is, no line is longer, nothing
    is imported unused or left undefined, and no line is marked for the formatter to leave alone."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(PACKAGE))
    for command in (["format", "--check", "."], ["check", "--select", "E501,F", "."]):
        done = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=repo, capture_output=True, text=True)
        assert done.returncode == 0, f"ruff {' '.join(command)}:\n{done.stdout}{done.stderr}"
    for root in ("src", "tests", "scripts"):
        for folder, _, files in os.walk(os.path.join(repo, root)):
            for name in (f for f in files if f.endswith(".py")):
                text = open(os.path.join(folder, name), encoding="utf-8").read()
                assert "fmt: " + "skip" not in text, os.path.join(folder, name)
