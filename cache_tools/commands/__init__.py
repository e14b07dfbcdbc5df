"""The ``cache-tools`` command line: one module per command (``add_arguments``, ``run``),
plus ``cli`` (the dispatcher) and ``options`` (option types and text shared with ``pipeline``).
"""
