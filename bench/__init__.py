"""Benchmarks of the relay against a bare reference relay: ``python -m bench``.

See ``bench/README.md`` for the scenarios, the targets and the measured table.
"""
