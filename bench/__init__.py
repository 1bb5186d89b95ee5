"""Benchmarks of django-imagetags (issue 5). Run ``bench/run`` or ``python -m bench``.

Not part of the installed package and not tests: they print measured ratios against targets
(``docs/performance.md`` holds the latest table and how to read it).
"""
