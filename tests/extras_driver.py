"""Run CLI commands in one process with one optional package made unimportable.

    python extras_driver.py PACKAGE COMMANDS.json RESULTS.json

COMMANDS.json: {name: argv}. PACKAGE is put in sys.modules as None before anything else
is imported, so `import PACKAGE` (and its submodules) raises ModuleNotFoundError, as on a
machine where it is not installed ("-" blocks nothing). RESULTS.json: {name: {"rc", "stderr"}}.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys


def main() -> None:
    package, commands_file, results_file = sys.argv[1:4]
    if package != "-":
        sys.modules[package] = None  # type: ignore[assignment]
    from stream_readapt.cli import main as cli

    results = {}
    for name, argv in json.loads(open(commands_file).read()).items():
        logging.root.handlers.clear()  # the CLI's basicConfig binds the stderr of this command
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = cli(argv)
            except BaseException as e:  # noqa: BLE001 - recorded: the test asserts there is none
                rc = f"raised {type(e).__name__}: {e}"
        results[name] = {"rc": rc, "stderr": err.getvalue()}
    with open(results_file, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
