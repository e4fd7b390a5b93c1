"""The one way a generator script writes its generated source file, or (--check) fails when the
committed file differs from what it would write."""

import os
import sys


def write_or_check(path: str, text: str, check: bool) -> None:
    script = os.path.basename(sys.argv[0])
    if check:
        with open(path, encoding="utf-8") as f:
            if f.read() != text:
                sys.exit(f"{path} is stale: rerun scripts/{script}")
        print(f"{path} is up to date")
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {path}")
