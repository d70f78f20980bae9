"""The store: one schema module, engine/session setup and migrations (SQLite or Postgres)."""
