"""`python -m klbench.bench --worker SPEC OUT`: one side of a benchmark (started by `runner.run_worker`);
otherwise the same as `klbench bench`."""

import sys

from klbench.bench.runner import main, worker_main

if len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.exit(worker_main(sys.argv[2], sys.argv[3]))
sys.exit(main())
