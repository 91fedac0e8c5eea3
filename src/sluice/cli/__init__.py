"""Command-line entry points: ``sluice`` and ``kcli``."""
