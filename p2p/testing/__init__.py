"""Helpers for tests of gridmesh and of code built on it (as `trio.testing` is for trio).

Production code never imports this package; some of its modules need the test extras
(hypothesis)."""
