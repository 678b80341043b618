"""Launch probe: report what one launched process sees, then run the process-group check.

Usage: ``python tests/distributed/_probe.py OUT_DIR`` (under any launcher). Writes
``OUT_DIR/pid-<PID>.json`` with the world size the launcher announced and the one the
``Accelerator`` sees; exits with status 3 if :func:`kdforge.distributed.check_process_group`
refuses the launch (its message is in the JSON).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> int:
    from accelerate import Accelerator

    from kdforge.distributed import check_process_group, launched_world_size
    from kdforge.errors import DeviceError

    acc = Accelerator()
    info = {"launched": launched_world_size(), "num_processes": acc.num_processes,
            "rank": acc.process_index, "error": None}
    code = 0
    try:
        check_process_group(acc)
    except DeviceError as exc:
        info["error"] = str(exc)
        code = 3
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pid-{os.getpid()}.json").write_text(json.dumps(info))
    return code


if __name__ == "__main__":
    from _teardown import (
        exit_without_native_teardown,  # the launched script's folder is on sys.path
    )

    exit_without_native_teardown(main())
