"""`torchrun ... tests/rank_local_cli.py ARGS...`: the `pipeline` command with ``{rank}`` in its arguments
replaced by the process's rank, so each rank of a test run writes into its own folder, as the nodes of a
cluster without a shared file system do."""

import os
import sys

from cli import main

if __name__ == "__main__":
    sys.argv = ["pipeline", *(a.replace("{rank}", os.environ.get("RANK", "0")) for a in sys.argv[1:])]
    main()
