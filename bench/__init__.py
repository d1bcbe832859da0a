"""regproxy benchmark suite: ``python -m bench``.

One command starts a real distribution registry on 127.0.0.1 with test images, nginx as a
plain ``proxy_pass`` baseline and regproxy, measures blob throughput, manifest rate and
latency, concurrent pulls and regproxy's memory, and prints a table (ratios against nginx in
the same run). See docs/benchmarks.rst.
"""
