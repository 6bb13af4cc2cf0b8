"""FLUX.1-Kontext inference server: a thin entry point into the `kontext_server` package (the CLI, and `app` for
uvicorn).

    python flux_kontext_optimized.py                      # benchmark: unoptimised vs optimised (model from env or tiny)
    python flux_kontext_optimized.py serve --model tiny --port 8000
    python flux_kontext_optimized.py generate --prompt "make the car red" --image in.png --out out.png
    python flux_kontext_optimized.py benchmark --model synthetic-full --workload edit-1024
    uvicorn flux_kontext_optimized:app                    # configured by env (FLUX_MODEL, FLUX_OPTIMIZATIONS, ...)
"""
from __future__ import annotations

from kontext_server.cli import build_parser, config_from_env, configure_logging, main

__all__ = ["app", "build_parser", "config_from_env", "main"]


class _LazyApp:
    """`uvicorn flux_kontext_optimized:app`: the app is built on first use, from the environment, so importing this
    module (tests, the CLI) loads nothing."""

    _app = None

    def _get(self):
        if self._app is None:
            from kontext_server.startup import prepare_process

            prepare_process()  # before torch: see kontext_server/startup
            configure_logging()  # uvicorn configures only its own loggers: the per-request lines are ours
            from kontext_server.api.app import build_app
            from kontext_server.parallel import build_service

            cfg, server_settings = config_from_env()
            type(self)._app = build_app(build_service(cfg), server_settings)
        return self._app

    async def __call__(self, scope, receive, send):
        await self._get()(scope, receive, send)


app = _LazyApp()

if __name__ == "__main__":
    main()
