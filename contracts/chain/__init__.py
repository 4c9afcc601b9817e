"""The chain client: errors, the embedded dev chain, networks, keys, deployment records."""
