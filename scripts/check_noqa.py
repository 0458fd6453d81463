"""Lint: every `# noqa` and `# type: ignore` in the project's Python files says why
(`# noqa: E402 - after sys.path ...`, `# type: ignore[attr-defined]  # set by SQLModel ...`).

A bare suppression hides a rule for a reason nobody wrote down; this makes the reason part of the
line. Run by `make lint`; exit 1 lists the offending lines."""

from __future__ import annotations

import re
import subprocess
import sys

NOQA = re.compile(r"#\s*noqa(?::\s*[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*)?(?P<rest>.*)$")
TYPE_IGNORE = re.compile(r"#\s*type:\s*ignore(?:\[[\w\-, ]*\])?(?P<rest>.*)$")


def main() -> int:
    files = subprocess.run(["git", "ls-files", "*.py"], capture_output=True, text=True, check=True).stdout.split()
    bare = []
    for path in files:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                for kind, pattern in (("# noqa", NOQA), ("# type: ignore", TYPE_IGNORE)):
                    match = pattern.search(line)
                    if match and not re.search(r"\w", match.group("rest")):
                        bare.append(f"{kind} without a reason: {path}:{number}: {line.strip()}")
    for line in bare:
        print(line)
    return 1 if bare else 0


if __name__ == "__main__":
    sys.exit(main())
