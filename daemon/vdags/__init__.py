"""Running vDAGs: a compiled plan (scheduler.vdag) executed across the daemons that serve
its blocks, with its policies and Python blocks in the sandbox (daemon.sandbox).

Modules: values (bounds; a node's input from its feeds), executor (the dependency-driven
scheduler: parallel branches, retries on another instance, the deadline, errors naming the
node), runner (a step on an instance: a Python block over the block protocol, a model's
shard chain through daemon.shards), protocol (the block protocol and the `blocks` entries
announcing Python-block instances), pyblocks (AIOS's block SDK contract wrapped for the
sandbox pool), policies (policy URIs to packages, calls through the pool), service (the
daemon's VdagService: `infer`, the blocks it serves, the pool's lifecycle). README "vDAGs".
"""
