"""Peer-vs-us benchmarks. Each ``bench_<name>.py`` runs the peer and circuits in one process
and prints the ratio; ``python -m benchmarks [name ...]`` runs them (all by default)."""
