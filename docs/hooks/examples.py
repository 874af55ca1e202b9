"""MkDocs hook: pages made at build time from the code, so they cannot drift from it.

- `examples/*.py` (jupytext percent format) become `examples/<name>.md`: markdown cells as
  text, code cells as fenced Python.
- Each module of `ddpm_jax` gets an API page `api/<module>.md` rendered by mkdocstrings from
  its docstrings, listed in the nav under "API reference".
"""

from __future__ import annotations

import pathlib
import re

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = "ddpm_jax"
# Command-line entry points (`python -m ddpm_jax.data`) hold no API.
SKIP_MODULES = {"ddpm_jax.data.__main__"}

_CELL = re.compile(r"^# %%(.*)$")


def percent_to_markdown(source: str) -> str:
    """A jupytext percent-format script as markdown: `# %% [markdown]` cells lose their `# `
    prefix, code cells become ```python blocks; the header before the first cell is dropped."""
    cells: list[tuple[str, list[str]]] = []
    for line in source.splitlines():
        match = _CELL.match(line)
        if match:
            kind = "markdown" if "[markdown]" in match.group(1) else "code"
            cells.append((kind, []))
        elif cells:
            cells[-1][1].append(line)
    parts = []
    for kind, lines in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if not lines:
            continue
        if kind == "markdown":
            parts.append("\n".join(re.sub(r"^# ?", "", line) for line in lines))
        else:
            parts.append("```python\n" + "\n".join(lines) + "\n```")
    return "\n\n".join(parts) + "\n"


def api_modules() -> list[str]:
    """Every importable module of the package, dotted, in path order."""
    names = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            if (path.stat().st_size == 0) or len(parts) == 1:
                continue
        name = ".".join(parts)
        if name not in SKIP_MODULES:
            names.append(name)
    return names


def _api_page(module: str) -> str:
    return f"# `{module}`\n\n::: {module}\n"


def on_config(config):
    modules = api_modules()
    for entry in config.nav:
        if isinstance(entry, dict) and "API reference" in entry:
            entry["API reference"] = list(entry["API reference"]) + [
                {module.removeprefix(PACKAGE + "."): f"api/{module}.md"} for module in modules
            ]
    return config


def on_files(files, config):
    for script in sorted((ROOT / "examples").glob("*.py")):
        files.append(
            File.generated(
                config,
                f"examples/{script.stem}.md",
                content=percent_to_markdown(script.read_text()),
            )
        )
    for module in api_modules():
        files.append(File.generated(config, f"api/{module}.md", content=_api_page(module)))
    return files
