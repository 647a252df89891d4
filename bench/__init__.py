"""Benchmarks of issue #8: `make bench` (all five) or `python -m bench B2` (one).

B1 bridge throughput, B2 consumer throughput, B3 publish→Job latency, B4 memory, B5 render cost.
Each prints one table with the machine and a baseline measured in the same run. Everything
listens and connects on 127.0.0.1 only.
"""
