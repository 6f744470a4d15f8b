"""`python -m bench [--quick] [NAME ...]`: run every benchmark in bench/ and print one table."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

from bench.common import Row, format_table
from gpt2repro.devices import quiet_library_logs


def main() -> None:
    quiet_library_logs()
    found = pkgutil.iter_modules([str(Path(__file__).parent)])
    names = sorted(m.name for m in found if m.name != "common" and not m.name.startswith("_"))
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(names)} (default: all)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = p.parse_args()
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(names)}")
    rows: list[Row] = []
    for name in args.names or names:
        print(f"running bench/{name}.py ...", file=sys.stderr, flush=True)
        rows += importlib.import_module(f"bench.{name}").run(quick=args.quick)
    print(format_table(rows))


if __name__ == "__main__":
    main()
