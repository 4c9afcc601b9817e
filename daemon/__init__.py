"""gridmesh: the daemon process, its APIs and its CLI."""

__version__ = "0.1.0"
