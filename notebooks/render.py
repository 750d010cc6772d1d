"""Render the guided-tour notebooks: each percent-format source notebooks/<name>.py becomes an executed
notebook <out>/<name>.ipynb (jupytext reads it, nbclient runs it top to bottom in a fresh kernel).

    python notebooks/render.py                                  # all three, into notebooks/executed/
    python notebooks/render.py inspect_model --set noise=False  # one, with a parameter changed
    python notebooks/render.py --set 'gallery="assets/gallery"' # and save the README's gallery pictures

`--set name=value` (a Python expression) is added after the notebook's parameters cell, as papermill does.
A cell that raises stops the rendering with the cell's error. jupytext, nbclient, nbformat and ipykernel are
test extras (requirements-test.txt; `make test` installs them), not part of the core install.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("inspect_data", "inspect_model", "inspect_weights")
PACKAGES = ("jupytext", "nbclient", "nbformat", "ipykernel")


def missing_packages() -> list[str]:
    import importlib.util

    return [p for p in PACKAGES if importlib.util.find_spec(p) is None]


def load(name: str, params: dict[str, str]):
    """The notebook `name` as an nbformat notebook, `params` (name -> Python source of the value) in a cell
    tagged "injected-parameters" right after the cell tagged "parameters"."""
    import jupytext
    import nbformat

    nb = jupytext.read(ROOT / "notebooks" / f"{name}.py")
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not tagged:
        raise ValueError(f"notebooks/{name}.py has no cell tagged parameters")
    if params:
        cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v}" for k, v in params.items()))
        cell.metadata["tags"] = ["injected-parameters"]
        nb.cells.insert(tagged[0] + 1, cell)
    return nb


def execute(nb, timeout: int = 600):
    """Run every cell in a fresh python3 kernel started in the repository root; raises on a cell's error."""
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    return nb


def render(name: str, out: Path, params: dict[str, str]) -> tuple[Path, float]:
    """Execute notebooks/<name>.py and write <out>/<name>.ipynb: (its path, seconds)."""
    import nbformat

    start = time.perf_counter()
    nb = execute(load(name, params))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path, time.perf_counter() - start


def parse_set(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"--set {item}: expected name=value (a Python expression)")
        params[key.strip()] = value
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python notebooks/render.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"notebooks to render (default: all of {', '.join(NOTEBOOKS)})")
    parser.add_argument("--out", default=str(ROOT / "notebooks" / "executed"), help="folder for the .ipynb files")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter of the notebooks' parameters cell (a Python expression)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in NOTEBOOKS]
    if unknown:
        print(f"error: no notebook {unknown[0]!r} (one of: {', '.join(NOTEBOOKS)})", file=sys.stderr)
        return 2
    missing = missing_packages()
    if missing:
        print(f"error: rendering the notebooks needs {', '.join(missing)}: `make test` installs them "
              f"(requirements-test.txt)", file=sys.stderr)
        return 2
    try:
        params = parse_set(args.set)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from nbclient.exceptions import CellExecutionError

    for name in args.names or NOTEBOOKS:
        try:
            path, seconds = render(name, Path(args.out), params)
        except CellExecutionError as e:
            print(f"error: notebooks/{name}.py failed:\n{e}", file=sys.stderr)
            return 1
        print(f"{path} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
