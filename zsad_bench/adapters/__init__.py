"""Dataset adapters shipped with zsad-bench.

Each module registers one or more ``SCHEME:PATH`` adapters with
:func:`zsad_bench.data.register_dataset` and is exposed through the ``zsad_bench.datasets``
entry-point group in ``pyproject.toml``.
"""
