"""Other ways to serve the same HTTP app: today one, Ray Serve (ray_serve/), for replicas across GPUs and machines.

The local server (kontext_server.api with kontext_server.engine) needs nothing from here; nothing here is imported
unless `serve --engine ray` (or a Ray Serve config file) asks for it, so Ray stays an optional dependency.
"""
