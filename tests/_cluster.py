"""A local Dask cluster of worker processes on 127.0.0.1, for tests: prints the scheduler address,
then runs until its stdin closes. Worker processes must be started from an importable module under
a main guard, hence a script of its own."""

import sys

from distributed import LocalCluster

if __name__ == "__main__":
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        print(cluster.scheduler_address, flush=True)
        sys.stdin.read()
