"""Generated data sources: a source spec `NAME:...` whose NAME is a registered generator is written to a file
first (once per spec and data directory), and the file is then read like any other source.

The bundled demos register `demo` (`demo:pairs:N:SEED`, `demo:prompts:N:SEED`; chatrlhf/demo/task.py) and
`calculator` (`calculator:prompts:N:SEED`; chatrlhf/demo/calculator.py). Generators
are looked up by `module:function` name when a spec uses them, as reward functions are, so this generic layer does
not import any task.
"""

from __future__ import annotations

import importlib
from pathlib import Path

GENERATORS = {"demo": "chatrlhf.demo.task:materialize", "calculator": "chatrlhf.demo.calculator:materialize"}
"""Scheme → `module:function` called as `function(spec, data_dir) -> path` for specs `SCHEME:...`."""


def resolve_generated(spec: str, data_dir: str | Path) -> str:
    """The path of `spec`: a generated source is written into `data_dir` and its file returned; any other spec is
    returned as is."""
    scheme = spec.split(":", 1)[0]
    if ":" not in spec or scheme not in GENERATORS:
        return spec
    module, function = GENERATORS[scheme].split(":")
    return str(getattr(importlib.import_module(module), function)(spec, data_dir))
