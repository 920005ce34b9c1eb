"""torchrun as `train` starts it (`python -m mnist_pipeline.torchrun ARGS`): torch's own
launcher, run in this process, which only changes what it prints when it fails.

torchrun ends a failure of its own (a rendezvous that failed: a node that never came, a
port taken) with a 40-line traceback of its internals, and a failed rank with its report
inside another traceback. Here the report of a failed rank is printed as it is, without
the traceback, and no traceback at all is printed for the rest: what failed goes, as JSON,
to the file TORCHRUN_FAILURE_ENV names, where distributed.launch() reads it and says in one
line what happened and what to do.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

# Where main() writes what failed. No torch import here: see torchrun_main().
TORCHRUN_FAILURE_ENV = "MNIST_PIPELINE_TORCHRUN_FAILURE_FILE"
CPP_LOG_LEVEL_ENV = "TORCH_CPP_LOG_LEVEL"


def main() -> int:
    # Popped, so that the ranks torchrun starts do not inherit it.
    failure_file = os.environ.pop(TORCHRUN_FAILURE_ENV, "")
    failure: dict[str, Any]
    try:
        torchrun_main()
        return 0
    except Exception as e:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        if not failure_file:
            raise  # nobody to tell: torchrun's own traceback
        if isinstance(e, ChildFailedError):
            print(e, file=sys.stderr, flush=True)  # torchrun's report: which rank, and how
            rank, first = e.get_first_failure()
            signal = first.signal_name() if first.exitcode < 0 else None
            failure = {"rank": rank, "exitcode": first.exitcode, "signal": signal}
        else:
            failure = {"error": type(e).__name__, "message": str(e)}
            failure["traceback"] = traceback.format_exc()
    Path(failure_file).write_text(json.dumps(failure))
    return 1


def torchrun_main() -> None:
    """torchrun's main(). Its store logs each failed attempt to reach node 0 with a C++
    stack trace, which says nothing the one line will not: torch's C++ log is quiet in
    this process unless TORCH_CPP_LOG_LEVEL is set (INFO shows it all); the ranks log as
    they always did."""
    quiet = CPP_LOG_LEVEL_ENV not in os.environ
    if quiet:
        os.environ[CPP_LOG_LEVEL_ENV] = "FATAL"
    from torch.distributed import run  # torch reads the level as it loads

    if quiet:
        del os.environ[CPP_LOG_LEVEL_ENV]  # the ranks start with torchrun's environment
    run.main()


if __name__ == "__main__":
    sys.exit(main())
