"""``catp bench``: measured latency, throughput and memory per stage next to analytic FLOPs.

Modules: :mod:`~catp.bench.flops` (cost model from the config), :mod:`~catp.bench.archs`
(paper-shaped random-weight models), :mod:`~catp.bench.timing` (stage hooks, peak memory),
:mod:`~catp.bench.runner` (the grid and targets (a)-(d)), :mod:`~catp.bench.report`
(table, plot, Markdown), :mod:`~catp.bench.vllm` (throughput in vLLM, ``catp bench --engine vllm``);
the command is :mod:`catp.cli.bench`. See docs/performance.md.
"""
