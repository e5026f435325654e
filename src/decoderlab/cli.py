"""The `decoderlab` command line: a thin typer layer over the Python API.

User errors print one line (`error: ...`) and exit with code 2; anything else is a bug and shows a
traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="decoderlab: one causal transformer with an explicit attention-mask algebra.")
console = Console()


@app.command()
def info(path: str = typer.Argument(..., help="A checkpoint folder (HF format) or a preset name.")) -> None:
    """Print a model's architecture, parameter count, dtype and context length."""
    from .checkpoint import describe

    summary = describe(path)
    table = Table(show_header=False, box=None)
    for key, value in summary.items():
        shown = f"{value:,}" if key == "parameters" else str(value)
        table.add_row(f"[bold]{key.replace('_', ' ')}[/bold]", shown)
    console.print(table)


@app.command()
def presets() -> None:
    """List the named model presets."""
    from .config import PRESETS

    table = Table("preset", "parameters", "layers", "heads", "width", "context", "positions")
    for name, cfg in PRESETS.items():
        table.add_row(name, f"{cfg.num_params():,}", str(cfg.n_layers), str(cfg.n_heads), str(cfg.d_model),
                      str(cfg.context_length), cfg.positions)
    console.print(table)


def main() -> None:
    try:
        app()  # standalone: typer reports usage errors itself (exit code 2)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
