"""The API reference (docs/api/*.md): every object its `:::` blocks list exists, has a
docstring, and that docstring names each argument (`Args:`) and says what comes back
(`Returns:`); and every public name of the main packages is on some page, so that a new one
cannot be left out. The objects are imported for real, as mkdocstrings reads them."""
from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import pytest
import yaml

API = Path(__file__).resolve().parents[1] / "docs" / "api"
# The packages whose every public name (`__all__`) must be documented somewhere.
PUBLIC = ("bnntrain.nn", "bnntrain.models", "bnntrain.infer", "bnntrain.tools.export", "bnntrain.engine",
          "bnntrain.data")
DIRECTIVE = re.compile(r"^::: *([\w.]+) *$")
ARGS = ("Args", "Arguments", "Parameters")
NO_VALUE = (inspect.Signature.empty, None, "None")


def directives(text: str) -> Iterator[tuple[str, dict]]:
    """Each `::: path` of a page with its options (the indented YAML block under it)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = DIRECTIVE.match(line)
        if match is None:
            continue
        block = []
        for follow in lines[i + 1:]:
            if follow.strip() and not follow.startswith(" "):
                break
            block.append(follow)
        yield match[1], (yaml.safe_load("\n".join(block)) or {}).get("options", {})


def resolve(path: str) -> Any:
    """The module or object at a dotted path, imported for real."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError:
        parent, _, name = path.rpartition(".")
        return getattr(importlib.import_module(parent), name)


def listed() -> list[tuple[str, str, Any]]:
    """(page, dotted path, object) for everything the API pages document."""
    pages = sorted(API.glob("*.md"))
    assert pages, f"no API pages in {API}"
    out = []
    for page in pages:
        for path, options in directives(page.read_text()):
            target = resolve(path)
            if not isinstance(target, ModuleType):
                out.append((page.name, path, target))
                continue
            members = options.get("members")
            assert isinstance(members, list) and members, f"{page.name}: `::: {path}` lists no members"
            for name in members:
                assert hasattr(target, name), f"{page.name}: {path} has no {name}"
                out.append((page.name, f"{path}.{name}", getattr(target, name)))
    return out


LISTED = listed()


def section_names(doc: str, headers: tuple[str, ...]) -> set[str]:
    """The names a Google-style section (`Args:` ...) describes, one `name:` entry each."""
    names: set[str] = set()
    lines = inspect.cleandoc(doc).splitlines()
    for i, line in enumerate(lines):
        if line.rstrip(":").strip() not in headers or not line.rstrip().endswith(":") or line.startswith(" "):
            continue
        indent = None
        for entry in lines[i + 1:]:
            if entry.strip() and not entry.startswith(" "):
                break
            depth = len(entry) - len(entry.lstrip())
            indent = indent if indent is not None or not entry.strip() else depth
            match = re.match(r"\s*\**(\w+)\s*(\([^)]*\))?:", entry)
            if match and depth == indent:
                names.add(match[1])
    return names


def has_section(doc: str, *headers: str) -> bool:
    return any(re.search(rf"^{h}:\s*$", inspect.cleandoc(doc), re.M) for h in headers)


def section_items(doc: str, header: str) -> list[str]:
    """The first line of each item of a section: the lines at its items' indentation (a
    continuation is indented further, or mkdocstrings shows it as an item of its own)."""
    lines = inspect.cleandoc(doc).splitlines()
    start = next((i for i, line in enumerate(lines) if line == f"{header}:"), None)
    if start is None:
        return []
    body = []
    for line in lines[start + 1:]:
        if line.strip() and not line.startswith(" "):
            break
        body.append(line)
    indent = min((len(line) - len(line.lstrip()) for line in body if line.strip()), default=0)
    return [line for line in body if line.strip() and len(line) - len(line.lstrip()) == indent]


def own_doc(obj: Any) -> str | None:
    """The object's own docstring: not a base class's, not the one dataclasses make up."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and doc and doc.startswith(f"{obj.__name__}("):
        return None
    return doc if doc and doc.strip() else None


@functools.lru_cache(maxsize=None)
def module_body(path: str) -> list[ast.stmt]:
    return ast.parse(Path(path).read_text()).body


def attribute_doc(name: str, obj: Any) -> str | None:
    """The docstring under `NAME = ...` in the module that defines the value (what griffe reads)."""
    for module in [m for key, m in sys.modules.items() if key.startswith("bnntrain") and m is not None]:
        if getattr(module, name, None) is not obj or not getattr(module, "__file__", None):
            continue
        body = module_body(module.__file__)
        for node, after in zip(body, body[1:]):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets) and isinstance(after, ast.Expr) \
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                return after.value.value
    return None


def parameters(fn: Any) -> list[str]:
    """The arguments a docstring must describe: not self/cls, *args or **kwargs."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return [p.name for p in signature.parameters.values()
            if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def check_function(where: str, fn: Any, doc: str) -> list[str]:
    problems = [f"{where}: argument '{name}' is not in its Args" for name in parameters(fn)
                if name not in section_names(doc, ARGS)]
    returns = inspect.signature(fn).return_annotation
    if returns not in NO_VALUE and not has_section(doc, "Returns", "Yields"):
        problems.append(f"{where}: returns {returns} but has no Returns section")
    for header in ("Returns", "Yields"):
        if len(section_items(doc, header)) > 1:
            problems.append(f"{where}: its {header} section has several items (indent the continuation)")
    return problems


def check_class(where: str, cls: type, doc: str) -> list[str]:
    """The constructor's arguments (in the class's or `__init__`'s docstring, merged on the page)
    and each public method defined here, documented unless it overrides a documented one."""
    init = cls.__dict__.get("__init__")
    text = doc + "\n\n" + (inspect.cleandoc(init.__doc__) if init is not None and init.__doc__ else "")
    described = section_names(text, ARGS) | section_names(text, ("Attributes",))
    problems = [f"{where}: argument '{name}' is not in its Args" for name in parameters(cls) if name not in described]
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        fn = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        if not inspect.isfunction(fn):
            continue
        mdoc = fn.__doc__
        inherited = any(getattr(getattr(base, name, None), "__doc__", None) for base in cls.__mro__[1:])
        if not mdoc:
            if not inherited:
                problems.append(f"{where}.{name}: no docstring")
        elif not isinstance(member, property):
            problems += check_function(f"{where}.{name}", fn, mdoc)
    return problems


def check(path: str, obj: Any) -> list[str]:
    if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
        doc = own_doc(obj)
        if doc is None:
            return [f"{path}: no docstring"]
        return check_class(path, obj, doc) if inspect.isclass(obj) else check_function(path, obj, doc)
    if attribute_doc(path.rpartition(".")[2], obj) is None:
        return [f"{path}: no docstring under its assignment"]
    return []


@pytest.mark.parametrize("page", sorted({page for page, _, _ in LISTED}))
def test_every_listed_object_is_documented(page: str) -> None:
    problems = [problem for p, path, obj in LISTED if p == page for problem in check(path, obj)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("package", PUBLIC)
def test_every_public_name_is_on_a_page(package: str) -> None:
    documented = {(path.rpartition(".")[2], id(obj)) for _, path, obj in LISTED}
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if (name, id(getattr(module, name))) not in documented]
    assert not missing, f"{package}.__all__ names {', '.join(missing)}, which no page of docs/api documents"


def test_the_checks_see_a_missing_argument() -> None:
    """The Args parser itself: a name in prose is not an entry, a nested line is not one."""
    doc = """Do it.

    Args:
        cfg: the config; x: is prose here
            depth: a continuation, not an entry

    Returns:
        Nothing much.
    """
    assert section_names(doc, ARGS) == {"cfg"}
    assert has_section(doc, "Returns") and not has_section(doc, "Raises")
    assert section_items(doc, "Returns") == ["    Nothing much."]
    assert len(section_items(doc.replace("Nothing much.", "Nothing\n        much."), "Returns")) == 2
