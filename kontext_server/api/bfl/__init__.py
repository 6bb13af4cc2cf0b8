"""Black Forest Labs-shaped asynchronous routes: protocol.py (the wire format), serving.py (submit -> stored job,
the result's JSON, cancel), errors.py (BFL's `{"detail": ...}` error shape) and router.py (the routes). The jobs
themselves live in kontext_server/jobstore."""
