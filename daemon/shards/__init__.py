"""Block shards: models cut into ranges of layers, served by daemons."""
