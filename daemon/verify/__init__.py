"""Verified work: the requester checks that providers computed their steps right.

- `policy`: which steps to check, and the requester's view of each provider (probation,
  exclusion with back-off, the reputation that breaks routing ties); sans-IO.
- `compare`: when two outputs of one step agree (exact, or within a documented tolerance).
- `detection`: the expected number of steps until a cheater is caught.
- `replica`: running a hop's step again on another server (and a check's plan, drawn when
  its step starts); `links`: the streams kept to replicas for it; `followers`: the replica
  session that follows each provider hop of a generation.
- `gather`: a speculating generation's checks, gathered so that a replica runs several at once.
- `deferred`: a paid generation's receipts, held until their step's checks are done.
- `canaries`: known-good steps, sent again as ordinary traffic.
- `verifier`: the checks of a generation, driven by the shard client's hooks.
- `cheat`: adversarial providers, for tests and benchmarks only.
"""
