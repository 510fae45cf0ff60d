"""Runs one fuzz harness under atheris (libFuzzer): `python -m tests.fuzz.runner NAME [libFuzzer options]`.

Each harness is `tests/fuzz/fuzz_<NAME>.py` with a pure `test_one_input(data: bytes) -> None` that raises only on a
real defect (an expected, typed rejection returns normally). The harness module is imported inside
`atheris.instrument_imports()` so that the agent code it reaches is instrumented for coverage (the harness's own
`main()` calls this, so `python -m tests.fuzz.fuzz_bundle` is the same run). The corpus directory is
tests/fuzz/corpus/<NAME>/: given first on libFuzzer's command line, new inputs are written into it (Makefile `fuzz`).
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

HARNESSES = ("bundle", "manifest", "oip_http", "oip_mqtt", "chunks", "config", "tuf")
CORPUS = Path(__file__).parent / "corpus"
# What each harness instruments besides agent.*: the TUF harness also follows python-tuf's own parsing.
_EXTRA = {"tuf": ["tuf", "securesystemslib"]}


def fuzz(name: str, argv: list[str]) -> None:
    import atheris  # only the fuzzing run needs it; the corpus replay (make test) does not

    # The agent logs every refusal (a warning per bad request or rejected metadata file): at thousands of inputs a
    # second that is most of the run's time and all of its output. Only here: the corpus replay runs inside pytest.
    logging.disable(logging.CRITICAL)

    if name not in HARNESSES:
        raise SystemExit(f"unknown harness {name!r}: one of {', '.join(HARNESSES)}")
    module_name = f"tests.fuzz.fuzz_{name}"
    already = [m for m in sys.modules if m == "agent" or m.startswith("agent.")]
    with atheris.instrument_imports(include=["agent", module_name, *_EXTRA.get(name, [])]):
        harness = importlib.import_module(module_name)
    if already:  # imported before instrumentation (e.g. by `python -m tests.fuzz.fuzz_x`): instrument them now
        atheris.instrument_all()
    # libFuzzer's -merge, -fork and -jobs run argv[0] again through the shell: make it the command that runs this
    command = f"{sys.executable} -m tests.fuzz.runner {name}"
    atheris.Setup([command, *argv[1:]], harness.test_one_input)
    atheris.Fuzz()


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(f"usage: python -m tests.fuzz.runner NAME [libFuzzer options]; NAME: {', '.join(HARNESSES)}")
    fuzz(sys.argv[1], [sys.argv[0], *sys.argv[2:]])


if __name__ == "__main__":
    main()
