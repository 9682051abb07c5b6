"""The audit log: the writer thread, the hash chain, checkpoints, filters, queries and retention."""
