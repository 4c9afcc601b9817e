"""Block shards: models cut into ranges of layers, served by daemons."""

# here, not in server.py: the daemon registers it without importing torch
SHARD_PROTOCOL = "/gridmesh/shard/1.0.0"
