"""The layers depend one way (issue 11; docs/design.md, "Layout"): every import in server/,
storage/ and the Python client package points down or sideways, never up.

    entry points      python -m server | server.ledger | .reference | .exchange | .dev (aliases)
         |
    commands, ctl     the command lines: server/commands/, server/ctl/ (subsidyctl)
         |
    processes         gateway, worker, create_server, sweeper, ledger writer: server/processes/
         |
    services          gRPC servicers, thin mapping between messages and the layers below
         |
    rpc               the gRPC edge: errors, authentication, TLS: server/rpc/
         |
    storage           SQL, Redis keys and fields, Lua scripts: storage/ (and nowhere else)
         |
    domain            pure rules: server/domain/ (no grpc, protobuf, generated code, redis, asyncpg)

Beside them: ``client`` (clients/python/subsidy_client, the generated code and the client; it
imports nothing of the server) and ``settings`` (server/config.py, server/logs.py). The
``server`` package itself stays empty, so that storage importing ``server.domain`` loads
nothing above the domain.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = {"server": ROOT, "storage": ROOT, "subsidy_client": ROOT / "clients" / "python"}

# Module (or package) -> layer; a module belongs to the layer of the longest name that prefixes it.
# "server" itself names only the package's __init__.py: everything in server/ is in a layer below.
LAYERS: dict[str, str] = {
    "server": "package",
    "server.domain": "domain",
    "storage": "storage",
    "subsidy_client": "client",
    "server.config": "settings",
    "server.logs": "settings",
    "server.rpc": "rpc",
    "server.services": "services",
    "server.processes": "processes",
    "server.commands": "commands",
    "server.ctl": "commands",
    "server.__main__": "entry",
    "server.ledger": "entry",
    "server.reference": "entry",
    "server.exchange": "entry",
    "server.dev": "entry",
}

# The arrows: which layers a layer's modules may import (their own included).
ALLOWED: dict[str, set[str]] = {
    "package": set(),
    "domain": {"domain"},
    "storage": {"storage", "domain"},
    "client": {"client"},
    "settings": {"settings"},
    "rpc": {"rpc", "settings", "storage", "domain", "client"},
    "services": {"services", "rpc", "storage", "domain", "client"},
    "processes": {"processes", "services", "rpc", "settings", "storage", "domain", "client"},
    "commands": {"commands", "processes", "services", "rpc", "settings", "storage", "domain", "client"},
    "entry": {"commands", "processes"},
}

# Third-party packages a layer must not import: the domain is pure; gRPC and protobuf stay
# above storage; only storage, processes and commands talk to the database drivers (the last
# two only to open connections and name their errors).
GRPC = {"grpc", "grpc_health", "grpc_reflection", "grpc_status", "google.protobuf", "google.rpc"}
DRIVERS = {"redis", "asyncpg"}
FORBIDDEN: dict[str, set[str]] = {
    "domain": GRPC | DRIVERS,
    "storage": GRPC,
    "client": DRIVERS,
    "settings": GRPC | DRIVERS,
    "rpc": DRIVERS,
    "services": DRIVERS,
}

# Servicers do not import one another: what two of them share lives in one of these.
SHARED_BY_SERVICES = {"server.services.common", "server.services.operations", "server.services.requests"}

FIRST_PARTY = tuple(SOURCE_ROOTS)
SQL = re.compile(r"\s*(SELECT|INSERT INTO|UPDATE \w+ SET|DELETE FROM|CREATE (TEMPORARY )?TABLE|CREATE DATABASE|DROP )")


def python_files() -> list[Path]:
    files = []
    for package, base in SOURCE_ROOTS.items():
        files += sorted((base / package).rglob("*.py"))
    return files


def module_name(path: Path) -> str:
    for package, base in SOURCE_ROOTS.items():
        if path.is_relative_to(base / package):
            parts = path.relative_to(base).with_suffix("").parts
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise AssertionError(f"{path} is outside the checked packages")


def layer_of(module: str) -> str | None:
    candidates = [name for name in LAYERS if module == name or (name != "server" and module.startswith(name + "."))]
    return LAYERS[max(candidates, key=len)] if candidates else None


def is_module(name: str) -> bool:
    top = name.split(".")[0]
    base = SOURCE_ROOTS.get(top)
    if base is None:
        return False
    path = base.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) for every import anywhere in the file, functions and TYPE_CHECKING blocks
    included; ``from package import module`` names the module."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if is_module(candidate) else base))
    return sorted(set(found))


def is_under(name: str, prefixes: set[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def test_every_module_belongs_to_a_layer() -> None:
    homeless = [str(path.relative_to(ROOT)) for path in python_files() if layer_of(module_name(path)) is None]
    assert not homeless, "modules in no layer (add them to LAYERS in tests/unit/test_layers.py):\n" + "\n".join(
        homeless
    )


def test_imports_point_down() -> None:
    offending = []
    for path in python_files():
        module = module_name(path)
        layer = layer_of(module)
        assert layer is not None
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, imported in imported_names(tree, module, path.name == "__init__.py"):
            where = f"{path.relative_to(ROOT)}:{line} ({layer})"
            if imported.split(".")[0] in FIRST_PARTY:
                target = layer_of(imported)
                if target not in ALLOWED[layer]:
                    allowed = ", ".join(sorted(ALLOWED[layer])) or "nothing"
                    offending.append(f"{where} imports {imported} ({target}); {layer} may import {allowed}")
            elif is_under(imported, FORBIDDEN.get(layer, set())):
                offending.append(f"{where} imports {imported}, which {layer} must not import")
    assert not offending, "imports that point the wrong way:\n" + "\n".join(offending)


def test_servicers_do_not_import_each_other() -> None:
    offending = []
    for path in python_files():
        module = module_name(path)
        if layer_of(module) != "services":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, imported in imported_names(tree, module, path.name == "__init__.py"):
            if layer_of(imported) == "services" and imported not in SHARED_BY_SERVICES and imported != module:
                shared = ", ".join(sorted(SHARED_BY_SERVICES))
                offending.append(f"{path.relative_to(ROOT)}:{line} imports {imported}; share through {shared}")
    assert not offending, "servicers importing servicers:\n" + "\n".join(offending)


def test_sql_lives_in_storage() -> None:
    """No SQL statement is written outside storage/."""
    offending: set[str] = set()
    for path in python_files():
        if module_name(path).startswith("storage"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                node = node.values[0]
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value):
                offending.add(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value[:60]!r}")
    assert not offending, "SQL outside storage/:\n" + "\n".join(sorted(offending))


def test_the_checks_see_a_wrong_arrow() -> None:
    """The checker itself: an upward import and a forbidden package are both reported."""
    tree = ast.parse("import grpc\nfrom server.services import common\nfrom server import logs\n")
    names = [name for _, name in imported_names(tree, "server.domain.example", is_package=False)]
    assert names == ["grpc", "server.services.common", "server.logs"]
    assert layer_of("server.helpers") is None  # a new module directly in server/ must be placed
    assert layer_of("server.services.common") not in ALLOWED["domain"]
    assert layer_of("server.logs") not in ALLOWED["domain"]
    assert is_under("grpc", FORBIDDEN["domain"])
    assert layer_of("storage.redis.keys") == "storage" and layer_of("server.domain.geo") == "domain"
