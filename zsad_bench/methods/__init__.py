"""Method plugins shipped with zsad-bench.

Each module defines one :class:`zsad_bench.detector.Detector` subclass decorated with
``@register_method`` and is exposed through the ``zsad_bench.methods`` entry-point group in
``pyproject.toml``, exactly as a third-party plugin package would do it.
"""
