"""Speed and memory benchmarks of meta-training against peers (learn2learn, higher, a plain loop).

One module per job:

* :mod:`metaopt.bench.workloads`: the MAML workload and the implementations compared (``METHODS``);
* :mod:`metaopt.bench.measure`: time, peak memory and operator counts of one meta-iteration;
* :mod:`metaopt.bench.isolated`: the same measurement in a fresh Python process;
* :mod:`metaopt.bench.report`: the Markdown report of ``metaopt bench`` (:func:`~metaopt.bench.report.run_benchmark`).

Outside the engine: it may import algorithms, the engine never imports it."""
