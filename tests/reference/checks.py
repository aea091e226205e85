"""The self-checks' bookkeeping, shared by check_reference.py and check_torch.py: each check prints one line, ok or
FAIL, and a script's exit code says whether any failed."""
import sys

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def run(checks):
    """Runs each of `checks` (functions that call `check`), prints how many checks failed, and exits: 1 if any did,
    else 0."""
    for c in checks:
        c()
    print(f"{len(failures)} failed")
    sys.exit(1 if failures else 0)
