"""FLUX.1-Kontext inference server: an HTTP service for FLUX.1-Kontext-dev (image + instruction -> edited image;
text -> image without one) with switchable, self-reporting speed optimisations.

Layers, each importing only the ones below it:
    cli -> api (HTTP: app, middleware, routes, protocol) -> engine (queue + one device worker)
                                                         -> service (plan, load, run a request, health)
    service -> optimizations (top-level package: the registry) -> optimizations.kernels (Triton)
    service -> models (where weights come from), patches (upstream fixes)
    api -> jobstore (durable async jobs: SQLite store, manager, webhooks) -> engine, storage (output stores)
    api, jobstore -> safe_http (outbound HTTP to client-given URLs)
    benchmark -> service;  settings and startup are leaves anyone may import.
Importing this package loads nothing heavy.
"""
__version__ = "2.0.0"
