"""The operator commands that need only the store and the config, one module per command group:
db, config, tokens, actions (replay, destinations, audit), routes (a dry run), views (messages, deliveries,
stats), purge and keys; common holds what they share.

`courier.tasks.cli` assembles them with the relay, the MLLP listener and Flower into the `courier`
console script (and `flask --app HOST courier ...` for a host). May import anything of courier.app.
"""
