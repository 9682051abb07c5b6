"""Users, keys and the policy, persisted: the schema and its migrations, and the SQLite backend."""
