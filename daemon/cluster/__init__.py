"""Clusters in the daemon: the runtime (`runtime`: failure detection, election and fenced
commands for every cluster this node is a member of) and its RPC method (`runtime_methods`)."""
