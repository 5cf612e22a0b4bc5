"""The ``zsad-bench`` command line; one module per command group, each with ``add_parser``."""
