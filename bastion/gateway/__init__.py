"""The SSH gateway: one connection object per client, its channels, the relay and the resolver."""
