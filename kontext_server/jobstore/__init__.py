"""Durable asynchronous jobs: the SQLite job store (store.py), the manager that runs stored jobs on the engine and
records their answers (manager.py), webhook delivery (webhooks.py) and the expiry sweeper (sweeper.py).
Imports nothing of the HTTP layer: routes (kontext_server/api/bfl) call the manager."""
