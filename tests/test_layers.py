"""The layer order of shared/DESIGN.md, checked on every import in the package (function-level
imports included): a module may import its own layer or the layers below it, never above.

    cli -> bench -> server -> api -> scaling / threads / tools -> engine -> attention / models / structured
        -> kv / kernels / tokenizer
"""

from __future__ import annotations

import ast
from pathlib import Path

import forkllm

ROOT = Path(forkllm.__file__).parent

RANK = {
    "kernels": 0,
    "kv": 0,
    "tokenizer": 0,
    "attention": 1,
    "models": 1,
    "structured": 1,  # grammars: the engine's sampler applies them
    "engine": 2,
    "scaling": 3,
    "threads": 3,
    "tools": 3,  # tool-call formats, parser, prompts; in-engine tool execution over the engine
    "api": 4,
    "__init__": 4,  # `from forkllm import LLM` is an import of the public API
    "server": 5,
    "bench": 6,
    "cli": 7,
}


def layer_of(module: str) -> str:
    """forkllm.engine.runner -> engine; forkllm.api -> api; forkllm -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def is_module(name: str) -> bool:
    return (ROOT / name).is_dir() or (ROOT / f"{name}.py").is_file()


def imports_of(path: Path) -> list[tuple[int, str]]:
    pkg = "forkllm." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name == "__init__.py":
        pkg = pkg.removesuffix(".__init__")
        base = pkg.split(".")
    else:
        base = pkg.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "forkllm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] == "forkllm":
                if mod == "forkllm":  # `from forkllm import kernels` names a subpackage, else the root
                    out += [
                        (node.lineno, f"forkllm.{a.name}" if is_module(a.name) else "forkllm")
                        for a in node.names
                    ]
                else:
                    out.append((node.lineno, mod))
    return out


def test_every_module_has_a_layer():
    layers = {
        layer_of("forkllm." + ".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in ROOT.rglob("*.py")
    }
    assert layers <= set(RANK), f"modules outside the layer map: {sorted(layers - set(RANK))}"


def test_imports_point_down():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        me = layer_of("forkllm." + ".".join(rel.with_suffix("").parts))
        for line, mod in imports_of(path):
            them = layer_of(mod)
            if them == me or {me, them} == {"api", "__init__"}:
                continue
            if RANK.get(them, 99) >= RANK[me]:
                bad.append(f"{rel}:{line} ({me}) imports {mod} ({them})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_nothing_imports_cli():
    users = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in ROOT.rglob("*.py")
        for line, mod in imports_of(p)
        if mod == "forkllm.cli" and p.name != "cli.py"
    ]
    assert not users


def test_cli_needs_no_server_extras():
    """`make run` installs the package without the [server] and [bench] extras: the CLI must build
    its parser (serve and bench subcommands included) without importing them."""
    import subprocess
    import sys

    blocked = ("fastapi", "uvicorn", "pydantic", "starlette", "prometheus_client", "httpx", "matplotlib")
    code = (
        "import sys\n"
        f"for m in {blocked!r}: sys.modules[m] = None\n"
        "from forkllm.cli import build_parser\n"
        "build_parser().parse_args(['generate', 'hi'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
