"""The SQL store: tables (models), engine and sessions (db), the outbox and everything else that reads or
writes Courier's rows (ordering, circuits, rate limits, tokens, audit, reports, retention, key rotation,
encryption at rest).

May import the domain, settings and observability; never the web layer, the MLLP listener, ingest,
the CLI or courier.tasks (import contracts in pyproject.toml).
"""
