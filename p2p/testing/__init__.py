"""Helpers for tests of gridmesh and of code built on it (as `trio.testing` is for trio).

`memnet`: the in-memory network (every part of `p2p.network.Network`, on trio's clock);
`conformance`: the suite every transport of that seam passes; `strategies`: shared
Hypothesis strategies. Production code never imports this package; some of its modules need
the test extras (hypothesis)."""
