"""The command line: `serve`, `generate`, `benchmark` (the default: unoptimised vs optimised on the configured model).

Every option that has an environment variable takes its default from kontext_server.settings, and its help says
which variable and default. Light to import: parsing arguments (and `--help`) loads neither torch nor the model;
each command imports what it needs when it runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from kontext_server import settings
from kontext_server.api.auth import KeyStore, exposure_warning
from kontext_server.api.rate_limit import RateRule
from kontext_server.request import parse_warmup_sizes
from kontext_server.service.config import NEW_SHAPE_POLICIES, ServiceConfig
from kontext_server.service.memory_tiers import parse_budget

log = logging.getLogger("flux")
WORKLOAD_NAMES = ["edit-1024", "t2i-1024", "edit-512"]  # kontext_server.benchmark.floor.WORKLOADS (kept light)


def _warmup_sizes_arg(spec: str) -> list[tuple[int, int, bool]]:
    try:
        return parse_warmup_sizes(spec)
    except ValueError as exc:  # argparse shows an ArgumentTypeError's message (a ValueError's only as "invalid")
        raise argparse.ArgumentTypeError(str(exc)) from None


def _api_keys_arg(path: str) -> KeyStore:
    try:
        return KeyStore.from_file(path)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _memory_budget_arg(spec: str) -> str | None:
    try:
        parse_budget(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec or None


def _rate_limit_arg(spec: str) -> RateRule:
    try:
        return RateRule.parse(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _delays_arg(spec: str) -> tuple[float, ...]:
    try:
        delays = tuple(float(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds separated by commas, e.g. 1,5,30 (got {spec!r})") from None
    if any(d < 0 for d in delays) or len(delays) > 10:
        raise argparse.ArgumentTypeError("at most 10 delays, none negative")
    return delays


def _ttl_arg(spec: str) -> float:
    try:
        ttl = float(spec)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (got {spec!r})") from None
    if not 1 <= ttl <= 7 * 24 * 3600:
        raise argparse.ArgumentTypeError("between 1 s and 7 days (presigned S3 URLs live at most 7 days)")
    return ttl


def _output_store_arg(spec: str) -> str:
    if spec != "local" and not (spec.startswith("s3://") and len(spec) > 5 and not spec[5:].startswith("/")):
        raise argparse.ArgumentTypeError(f"expected local or s3://bucket/prefix (got {spec!r})")
    return spec


def _env_help(text: str, var: settings.EnvVar) -> str:
    default = var.default if var.default is not None else "unset"
    return f"{text} (env {var.name}; default {default})"


def _opt(var: settings.EnvVar, kind):
    """An optional numeric setting: None when unset."""
    value = var.get()
    return None if value in (None, "") else kind(value)


def _add_model_args(p: argparse.ArgumentParser, default_opts: str | None = "auto") -> None:
    p.add_argument("--model", default=settings.MODEL.get(),
                   help=_env_help("tiny | synthetic-full | a hub id | a local diffusers directory", settings.MODEL))
    p.add_argument("--transformer", default=settings.TRANSFORMER.get(),
                   help=_env_help("a single .safetensors transformer in Black Forest Labs' layout (bf16, or fp8 e4m3 "
                                  "with or without scales); the rest of the pipeline from --model",
                                  settings.TRANSFORMER))
    p.add_argument("--device", default=settings.DEVICE.get(), help=_env_help("cuda, cuda:1, cpu", settings.DEVICE))
    p.add_argument("--optimizations",
                   default=settings.OPTIMIZATIONS.get() if settings.OPTIMIZATIONS.is_set() else default_opts,
                   help=_env_help("all | none | auto | comma list of: compile,qkv_fusion,channels_last,"
                                  "modulation_table,first_block_cache,attention,low_precision,dpm_solver,cuda_graphs",
                                  settings.OPTIMIZATIONS))
    p.add_argument("--compile-mode", default=settings.COMPILE_MODE.get(),
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help=_env_help("torch.compile mode", settings.COMPILE_MODE))
    p.add_argument("--compile-scope", default=settings.COMPILE_SCOPE.get(), choices=["regional", "full"],
                   help=_env_help("compile each transformer block (fast to compile) or one graph",
                                  settings.COMPILE_SCOPE))
    p.add_argument("--inductor-flags", default=settings.INDUCTOR_FLAGS.get(), choices=["none", "light", "seed"],
                   help=_env_help("light: the seed's flags without coordinate-descent tuning; seed: all of them "
                                  "(much slower compile)", settings.INDUCTOR_FLAGS))
    p.add_argument("--cache-dir", default=settings.CACHE_DIR.get(),
                   help=_env_help("tiny model, compile caches, bytecode", settings.CACHE_DIR))
    p.add_argument("--context-parallel", type=int, default=settings.CONTEXT_PARALLEL.get_int(), metavar="N",
                   help=_env_help("split each request over N ranks of this host (context parallelism): this process "
                                  "is rank 0 and starts the other N-1, one GPU each (without GPUs: N CPU processes "
                                  "on gloo)", settings.CONTEXT_PARALLEL))
    p.add_argument("--cp-ring-degree", type=int, default=settings.CP_RING_DEGREE.get_int(), metavar="R",
                   help=_env_help("of the N ranks, ring attention over R (GPU only), Ulysses over N/R",
                                  settings.CP_RING_DEGREE))
    p.add_argument("--cp-timeout", type=float, default=settings.CP_TIMEOUT.get_float(),
                   help=_env_help("seconds a collective waits for the other ranks", settings.CP_TIMEOUT))
    p.add_argument("--memory-budget", type=_memory_budget_arg, default=settings.MEMORY_BUDGET.get(), metavar="SIZE",
                   help=_env_help("GPU memory the model may use: 24GB, 16GB (GB = GiB), auto (the device's free "
                                  "memory); the transformer, T5 and the exact copy that do not fit are offloaded to "
                                  "host memory and streamed in, the VAE tiled (/health reports the tier)",
                                  settings.MEMORY_BUDGET))
    p.add_argument("--lora-dir", default=settings.LORA_DIR.get(),
                   help=_env_help("directory of LoRA adapters (one .safetensors file each, named by its stem); "
                                  "requests pick them with `loras`", settings.LORA_DIR))
    p.add_argument("--lora-preload", type=_names_arg, default=_names_arg(settings.LORA_PRELOAD.get()),
                   help=_env_help("adapters loaded onto the device at start-up, comma-separated",
                                  settings.LORA_PRELOAD))
    p.add_argument("--max-loras", type=int, default=settings.MAX_LORAS.get_int(),
                   help=_env_help("adapters kept loaded on the device; the least recently used leave first",
                                  settings.MAX_LORAS))
    p.add_argument("--lora-max-rank", type=int,
                   default=int(settings.LORA_MAX_RANK.get()) if settings.LORA_MAX_RANK.get() else None,
                   help=_env_help("rank of the adapter slots (default: the largest rank in --lora-dir); an adapter "
                                  "of a larger rank is refused", settings.LORA_MAX_RANK))
    p.add_argument("--lora-fuse", default=settings.LORA_FUSE.get(),
                   help=_env_help("NAME or NAME:SCALE: fuse one adapter of --lora-dir into the weights at start-up "
                                  "(zero overhead, every request runs it; /health reports it)", settings.LORA_FUSE))


def _add_provenance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-provenance-metadata", dest="provenance_metadata", action="store_false",
                   default=not settings.PROVENANCE_METADATA.off(),
                   help=_env_help("write no EXIF / PNG text saying the image is AI-generated",
                                  settings.PROVENANCE_METADATA))
    p.add_argument("--provenance-prompt", action="store_true", default=settings.PROVENANCE_PROMPT.get() == "1",
                   help=_env_help("write the prompt into that metadata too", settings.PROVENANCE_PROMPT))


def _names_arg(spec: str | None) -> list[str]:
    return [n.strip() for n in (spec or "").split(",") if n.strip()]


def service_config(a) -> ServiceConfig:
    try:
        return _service_config(a)
    except ValueError as exc:  # e.g. --lora-preload without --lora-dir
        sys.exit(f"error: {exc}")


def _service_config(a) -> ServiceConfig:
    return ServiceConfig(model=a.model, transformer=a.transformer, device=a.device, optimizations=a.optimizations,
                         compile_mode=a.compile_mode,
                         compile_scope=a.compile_scope, inductor_flags=a.inductor_flags,
                         cache_dir=Path(a.cache_dir) if a.cache_dir else None,
                         warmup_sizes=getattr(a, "warmup", None) or [],
                         new_shapes=getattr(a, "new_shapes", None) or "compile",
                         lora_dir=Path(a.lora_dir) if a.lora_dir else None, lora_preload=a.lora_preload,
                         max_loras=a.max_loras, lora_max_rank=a.lora_max_rank, lora_fuse=a.lora_fuse or None,
                         context_parallel=a.context_parallel, cp_ring=a.cp_ring_degree, cp_timeout=a.cp_timeout,
                         memory_budget=a.memory_budget)


def server_settings(a):
    from kontext_server.api.context import ServerSettings

    return ServerSettings(max_queue=a.max_queue, queue_timeout=a.queue_timeout, request_timeout=a.request_timeout,
                          shutdown_grace=a.shutdown_grace, drain_seconds=a.drain_seconds, api_keys=a.api_keys,
                          rate_limit=a.rate_limit, metrics_key_required=a.metrics_key_required,
                          served_model_name=a.served_model_name,
                          data_dir=Path(a.data_dir) if a.data_dir else settings.default_data_dir(a.cache_dir),
                          result_ttl=a.result_ttl, on_restart=a.on_restart, max_jobs=a.max_jobs,
                          sweep_interval=a.sweep_interval, output_store=a.output_store,
                          s3_endpoint_url=a.s3_endpoint_url, public_url=a.public_url,
                          allow_private_urls=a.allow_private_urls, url_fetch_timeout=a.url_fetch_timeout,
                          webhook_retry_delays=a.webhook_retry_delays, webhook_timeout=a.webhook_timeout,
                          provenance_metadata=a.provenance_metadata, provenance_prompt=a.provenance_prompt,
                          c2pa_cert=a.c2pa_cert, c2pa_key=a.c2pa_key, safety_checker=a.safety_checker)


def config_from_env():
    """What `serve` with no arguments would use: the CLI's defaults, which come from the settings."""
    a = build_parser().parse_args(["serve"])
    return service_config(a), server_settings(a)


def _load_or_exit(cfg: ServiceConfig):
    from kontext_server.engine import EngineError
    from kontext_server.lora.manager import LoraConfigError
    from kontext_server.models import ModelLoadError
    from kontext_server.parallel import build_service

    svc = build_service(cfg)
    try:
        svc.load()
    except (ModelLoadError, LoraConfigError, EngineError) as exc:  # EngineError: a context-parallel rank failed
        sys.exit(f"error: {exc}")
    return svc


def cmd_serve_ray(a) -> None:
    """`serve --engine ray`: the same app on Ray Serve, with model replicas (kontext_server/serving/ray_serve)."""
    try:
        from kontext_server.serving.ray_serve.options import cli_args
        from kontext_server.serving.ray_serve.run import serve_forever
    except ImportError as exc:  # Ray is optional: only this engine needs it
        sys.exit(f"error: --engine ray needs Ray Serve (pip install \"ray[serve]\"): {exc}")
    try:
        serve_forever(cli_args(a), host=a.host, port=a.port, ray_address=a.ray_address,
                      background_load=a.background_load)
    except ValueError as exc:  # a bad option, before anything started
        sys.exit(f"error: {exc}")
    except RuntimeError as exc:  # Serve could not deploy (a model that cannot load, a port in use)
        sys.exit(f"error: Ray Serve could not start the application: {exc}")


def cmd_serve(a) -> None:
    if a.engine == "ray":
        return cmd_serve_ray(a)
    import uvicorn

    from kontext_server.api.app import build_app
    from kontext_server.engine import EngineError
    from kontext_server.lora.manager import LoraConfigError
    from kontext_server.models import ModelLoadError
    from kontext_server.parallel import build_service

    settings_ = server_settings(a)
    warning = exposure_warning(a.host, settings_.api_keys)
    if warning:
        log.warning(warning)
    if settings_.api_keys is not None:  # how many, never which
        log.info("API keys: %d from %s", len(settings_.api_keys.digests), settings_.api_keys.source)
    svc = build_service(service_config(a))  # with --context-parallel N: rank 0, which starts the others at load
    if not a.background_load:
        try:  # fail at start-up, with the message, when the model (or a LoRA setting) cannot be had
            svc.load()
        except (ModelLoadError, LoraConfigError, EngineError) as exc:  # EngineError: a context-parallel rank failed
            sys.exit(f"error: {exc}")
    # uvicorn re-raises SIGTERM after its graceful shutdown; this handler, restored by then, makes a clean drain
    # exit with status 0 instead of dying of the signal.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Work still running after the grace period is interrupted by the app (JSON 503); the margin lets that answer
    # reach the client before uvicorn's own timeout cancels the handlers.
    from kontext_server.jobstore.store import DataDirInUse
    from kontext_server.provenance import ProvenanceConfigError

    try:  # a busy data directory, a C2PA certificate that cannot sign or a safety checker that cannot be imported
        app = build_app(svc, settings_)
    except (DataDirInUse, ProvenanceConfigError, ValueError, OSError) as exc:
        sys.exit(f"error: {exc}")
    log.info("data directory: %s (output store: %s)", settings_.data_dir, app.state.server.output_store.kind)
    # access_log off: the server writes its own line per request, without query strings (signed URLs carry their
    # signature there); uvicorn's access log would write them.
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False,
                timeout_graceful_shutdown=int(a.shutdown_grace) + 5)  # counted from the end of the drain


def _lora_spec(spec: str) -> dict:
    name, _, scale = spec.partition(":")
    try:
        return {"name": name, "scale": float(scale) if scale else 1.0}
    except ValueError:
        _fail(f"--lora {spec}: expected NAME or NAME:SCALE")


def _fail(message: str) -> None:
    sys.exit(f"error: {message}")


def cmd_generate(a) -> None:
    from pydantic import ValidationError

    from kontext_server.request import DEFAULT_STEPS, InferenceRequest
    from utils import ImageInputError, decode_image_bytes

    try:  # every input is checked before the model loads: a bad one costs nothing
        req = InferenceRequest(prompt=a.prompt, width=a.width, height=a.height, steps=a.steps, seed=a.seed,
                               guidance_scale=a.guidance_scale, loras=[_lora_spec(s) for s in a.lora])
    except ValidationError as exc:
        _fail("; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
                        for e in exc.errors()))
    image = None
    if a.image:
        try:
            image = decode_image_bytes(Path(a.image).read_bytes())
        except OSError as exc:
            _fail(f"--image {a.image}: {exc.strerror or exc}")
        except ImageInputError as exc:
            _fail(f"--image {a.image}: {exc}")
    out = Path(a.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        _fail(f"--out {a.out}: name a .png, .jpg or .webp file")
    if not out.parent.exists():
        _fail(f"--out {a.out}: the directory {out.parent} does not exist")
    svc = _load_or_exit(service_config(a))
    if svc.model.synthetic:
        print(f"note: model {svc.model.source!r} has random weights, so the image is noise "
              "(use --model with a hub id or a directory for real weights)", file=sys.stderr)
    from tqdm import tqdm

    steps = req.steps or DEFAULT_STEPS
    bar = tqdm(total=steps, desc="denoising", unit="step", file=sys.stderr)

    def progress():  # called between denoising steps; never stops the run
        bar.update(1)
        return None

    from kontext_server.lora.library import LoraError

    try:
        res = svc.generate(req, image, should_stop=progress)
    except LoraError as exc:
        _fail(f"--lora {exc.name}: {exc.reason}")
    finally:
        bar.close()
    from kontext_server.provenance import Provenance

    fmt = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(out.suffix.lower(), "png")
    out.write_bytes(Provenance(metadata=a.provenance_metadata, prompt=a.provenance_prompt,
                               model=str(a.model)).encode(res.images[0], fmt, prompt=req.prompt))
    print(json.dumps({"out": a.out, "seed": res.seed, "width": res.width, "height": res.height, "steps": res.steps,
                      "timings_ms": res.timings_ms,
                      "optimizations": {k: d.applied for k, d in res.optimizations.items()},
                      **({"context_parallel": res.parallel} if res.parallel else {}),
                      **({"memory_tier": res.memory_tier} if res.memory_tier else {})}, indent=1))


def cmd_benchmark(a) -> None:
    from tqdm import tqdm

    from kontext_server.benchmark import report
    from kontext_server.benchmark.requests import run_request_benchmark
    from kontext_server.benchmark.stages import run_stage_benchmark, stage_plan

    svc = _load_or_exit(service_config(a))
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = a.stages.split(",") if a.stages else None
    n = len([s for s in stage_plan() if stages is None or s.name in stages]) if a.workload else 3
    bar = tqdm(total=n, desc=a.workload or "benchmark", file=sys.stderr)

    def progress(msg: str) -> None:  # called as each stage starts: the bar counts stages started
        bar.update(1)
        bar.set_postfix_str(msg[:50])

    if a.workload:
        result = run_stage_benchmark(svc, a.workload, runs=a.runs, steps=a.steps, progress=progress, stages=stages)
        name = a.workload
    else:
        result = run_request_benchmark(svc, runs=a.runs, steps=a.steps, width=a.width, height=a.height, edit=a.edit,
                                       progress=progress)
        name = "request-benchmark"
    bar.close()
    md = report.to_markdown(result)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    report.bar_chart(result, str(out_dir / f"{name}.png"))
    print(f"\n{report.header(result)}\n")
    print(md)
    print(f"\nJSON: {out_dir / (name + '.json')}  chart: {out_dir / (name + '.png')}")


def build_parser() -> argparse.ArgumentParser:
    """The CLI; every default that has an environment variable reads it through kontext_server.settings."""
    p = argparse.ArgumentParser(prog="flux_kontext_optimized.py",
                                description="FLUX.1-Kontext inference server. With no command: `benchmark` "
                                            "(unoptimised vs optimised on the configured model).")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the HTTP server")
    _add_model_args(s)
    s.add_argument("--host", default=settings.HOST.get(), help=_env_help("listen address", settings.HOST))
    s.add_argument("--port", type=int, default=settings.PORT.get_int(), help=_env_help("listen port", settings.PORT))
    s.add_argument("--max-queue", type=int, default=settings.MAX_QUEUE.get_int(),
                   help=_env_help("requests waiting beside the running one before 429", settings.MAX_QUEUE))
    s.add_argument("--queue-timeout", type=float, default=settings.QUEUE_TIMEOUT.get_float(),
                   help=_env_help("seconds a request may wait in the queue before 503", settings.QUEUE_TIMEOUT))
    s.add_argument("--request-timeout", type=float, default=settings.REQUEST_TIMEOUT.get_float(),
                   help=_env_help("seconds a generation may run before it is stopped (504)", settings.REQUEST_TIMEOUT))
    s.add_argument("--shutdown-grace", type=float, default=settings.SHUTDOWN_GRACE.get_float(),
                   help=_env_help("seconds work gets to finish after SIGTERM", settings.SHUTDOWN_GRACE))
    s.add_argument("--drain-seconds", type=float, default=settings.DRAIN_SECONDS.get_float(),
                   help=_env_help("seconds the listener stays open after SIGTERM (/health and new work answer 503) "
                                  "before it closes", settings.DRAIN_SECONDS))
    s.add_argument("--warmup", type=_warmup_sizes_arg, default=settings.WARMUP_SIZES.get(),
                   help=_env_help("request shapes to compile / capture before serving: WxH (text-to-image) or "
                                  "edit:WxH, comma-separated, e.g. 1024x1024,edit:1024x1024", settings.WARMUP_SIZES))
    s.add_argument("--new-shapes", choices=NEW_SHAPE_POLICIES, default=settings.NEW_SHAPES.get(),
                   help=_env_help("a request at a shape --warmup did not compile: compile it then (the worker and "
                                  "the queue wait) or run it uncompiled (eager), which the response reports",
                                  settings.NEW_SHAPES))
    s.add_argument("--api-keys", type=_api_keys_arg, default=settings.API_KEYS.get(),
                   help=_env_help("file of API keys, one per line or sha256:<hex>; when set, generation routes, the "
                                  "/v1 routes and /benchmark need Authorization: Bearer <key> or x-key: <key>",
                                  settings.API_KEYS))
    s.add_argument("--rate-limit", type=_rate_limit_arg, default=settings.RATE_LIMIT.get(),
                   help=_env_help("per-key limit N/UNIT[,C], e.g. 60/min,2: 60 requests a minute and 2 concurrent "
                                  "jobs per key (one shared limit without --api-keys)", settings.RATE_LIMIT))
    s.add_argument("--metrics-key-required", action="store_true",
                   default=settings.METRICS_KEY_REQUIRED.get() == "1",
                   help=_env_help("/metrics needs an API key too", settings.METRICS_KEY_REQUIRED))
    s.add_argument("--served-model-name", default=settings.SERVED_MODEL_NAME.get(),
                   help=_env_help("the model id of the OpenAI routes (default: --model's value)",
                                  settings.SERVED_MODEL_NAME))
    j = s.add_argument_group("asynchronous jobs, outputs, URL inputs, webhooks")
    j.add_argument("--data-dir", default=settings.DATA_DIR.get(),
                   help=_env_help("the job store, local outputs and the URL-signing key (default: <cache dir>-data "
                                  "beside the cache directory); one server per directory", settings.DATA_DIR))
    j.add_argument("--result-ttl", type=_ttl_arg, default=settings.RESULT_TTL.get(),
                   help=_env_help("seconds results and their files are kept", settings.RESULT_TTL))
    j.add_argument("--on-restart", choices=["run", "error"], default=settings.ON_RESTART.get(),
                   help=_env_help("pending jobs found at start-up: run them, or mark them Error \"interrupted by "
                                  "restart\" (running ones are always marked Error)", settings.ON_RESTART))
    j.add_argument("--max-jobs", type=int, default=settings.MAX_JOBS.get_int(),
                   help=_env_help("jobs the store may hold (then 429)", settings.MAX_JOBS))
    j.add_argument("--sweep-interval", type=float, default=settings.SWEEP_INTERVAL.get_float(),
                   help=_env_help("seconds between sweeps of expired jobs and files", settings.SWEEP_INTERVAL))
    j.add_argument("--output-store", type=_output_store_arg, default=settings.OUTPUT_STORE.get(),
                   help=_env_help("local, or s3://bucket/prefix", settings.OUTPUT_STORE))
    j.add_argument("--s3-endpoint-url", default=settings.S3_ENDPOINT_URL.get(),
                   help=_env_help("an S3-compatible endpoint (R2, MinIO)", settings.S3_ENDPOINT_URL))
    j.add_argument("--public-url", default=settings.PUBLIC_URL.get(),
                   help=_env_help("the base URL clients reach this server at (polling_url, /v1/files URLs)",
                                  settings.PUBLIC_URL))
    j.add_argument("--allow-private-urls", action="store_true", default=settings.is_true(settings.ALLOW_PRIVATE_URLS),
                   help=_env_help("image and webhook URLs may reach private / loopback / link-local addresses",
                                  settings.ALLOW_PRIVATE_URLS))
    j.add_argument("--url-fetch-timeout", type=float, default=settings.URL_FETCH_TIMEOUT.get_float(),
                   help=_env_help("seconds an image URL may take, redirects included", settings.URL_FETCH_TIMEOUT))
    j.add_argument("--webhook-retry-delays", type=_delays_arg, default=settings.WEBHOOK_RETRY_DELAYS.get(),
                   help=_env_help("seconds before each webhook retry", settings.WEBHOOK_RETRY_DELAYS))
    j.add_argument("--webhook-timeout", type=float, default=settings.WEBHOOK_TIMEOUT.get_float(),
                   help=_env_help("seconds one webhook attempt may take", settings.WEBHOOK_TIMEOUT))
    _add_provenance_args(s)
    s.add_argument("--c2pa-cert", default=settings.C2PA_CERT.get(),
                   help=_env_help("PEM certificate chain, signing certificate first: with --c2pa-key every image "
                                  "carries a signed C2PA manifest", settings.C2PA_CERT))
    s.add_argument("--c2pa-key", default=settings.C2PA_KEY.get(),
                   help=_env_help("PEM private key of the signing certificate", settings.C2PA_KEY))
    s.add_argument("--safety-checker", default=settings.SAFETY_CHECKER.get(),
                   help=_env_help("module:callable(prompt, images) run before and after each generation: None / True "
                                  "allows, False / a reason blocks (422 content_policy, OpenAI 400 "
                                  "moderation_blocked); none ships", settings.SAFETY_CHECKER))
    s.add_argument("--background-load", action="store_true",
                   help="answer /live at once and load the model in the background (/health 503 until ready)")
    s.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    s.add_argument("--engine", choices=["local", "ray"], default=settings.ENGINE.get(),
                   help=_env_help("local: this process serves one device; ray: Ray Serve model replicas behind one "
                                  "ingress (needs ray[serve]; docs/operations.md)", settings.ENGINE))
    r = s.add_argument_group("--engine ray", "replicas, autoscaling and the Ray cluster (ignored by --engine local)")
    r.add_argument("--replicas", type=int, default=settings.REPLICAS.get_int(),
                   help=_env_help("model replicas (one GPU each on GPU machines)", settings.REPLICAS))
    r.add_argument("--min-replicas", type=int, default=_opt(settings.MIN_REPLICAS, int),
                   help=_env_help("autoscale: the fewest replicas", settings.MIN_REPLICAS))
    r.add_argument("--max-replicas", type=int, default=_opt(settings.MAX_REPLICAS, int),
                   help=_env_help("autoscale: the most replicas", settings.MAX_REPLICAS))
    r.add_argument("--target-ongoing-requests", type=float, default=settings.TARGET_ONGOING_REQUESTS.get_float(),
                   help=_env_help("autoscale: running + queued requests per replica to aim at",
                                  settings.TARGET_ONGOING_REQUESTS))
    r.add_argument("--upscale-delay", type=float, default=settings.UPSCALE_DELAY.get_float(),
                   help=_env_help("autoscale: seconds before adding a replica", settings.UPSCALE_DELAY))
    r.add_argument("--downscale-delay", type=float, default=settings.DOWNSCALE_DELAY.get_float(),
                   help=_env_help("autoscale: seconds before removing a replica", settings.DOWNSCALE_DELAY))
    r.add_argument("--replica-queue", type=int, default=settings.REPLICA_QUEUE.get_int(),
                   help=_env_help("requests a replica holds beside the running one; --max-queue is then the shared "
                                  "queue in front of all replicas", settings.REPLICA_QUEUE))
    r.add_argument("--replica-cpus", type=float, default=_opt(settings.REPLICA_CPUS, float),
                   help=_env_help("CPUs per replica", settings.REPLICA_CPUS))
    r.add_argument("--replica-gpus", type=float, default=_opt(settings.REPLICA_GPUS, float),
                   help=_env_help("GPUs per replica", settings.REPLICA_GPUS))
    r.add_argument("--ray-address", default=settings.RAY_ADDRESS.get(),
                   help=_env_help("a Ray cluster to join, e.g. auto or ray://head:10001 (unset: start a local one)",
                                  settings.RAY_ADDRESS))
    s.set_defaults(fn=cmd_serve)

    g = sub.add_parser("generate", help="one image to a file")
    _add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--image", help="input image (PNG / JPEG / WebP): an edit; without it, text-to-image")
    g.add_argument("--out", required=True, help="output file (PNG)")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--guidance-scale", type=float, default=2.5)
    _add_provenance_args(g)
    g.add_argument("--lora", action="append", default=[],
                   help="NAME or NAME:SCALE: an adapter of --lora-dir to run (repeat for up to 3)")
    g.set_defaults(fn=cmd_generate)

    b = sub.add_parser("benchmark", help="stage table (--workload) or unoptimised vs optimised (default)")
    _add_model_args(b, default_opts=None)
    b.add_argument("--workload", choices=WORKLOAD_NAMES)
    b.add_argument("--stages", help="comma list of stage names (default: all)")
    b.add_argument("--runs", type=int, default=None, help="timed runs per row (default 5 with --workload, else 3)")
    b.add_argument("--steps", type=int, default=None)
    b.add_argument("--width", type=int, default=256)
    b.add_argument("--height", type=int, default=256)
    b.add_argument("--edit", action="store_true")
    b.add_argument("--out-dir", default=settings.BENCH_DIR.get(), help=_env_help("results", settings.BENCH_DIR))
    b.set_defaults(fn=cmd_benchmark)
    return p


def configure_logging() -> None:
    """The server's loggers (flux.*) at FLUX_LOG_LEVEL, unless the host process configured logging already."""
    logging.basicConfig(level=settings.LOG_LEVEL.get(), format="%(asctime)s %(name)s %(message)s")


def main(argv: list[str] | None = None) -> None:
    configure_logging()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        # no command: the benchmark (unoptimised vs optimised on the configured model), with any options given
        argv = ["benchmark", *argv]
    p = build_parser()
    a = p.parse_args(argv)
    from kontext_server.startup import prepare_process

    prepare_process()  # before any command imports torch: see kontext_server/startup
    if a.cmd == "benchmark" and a.optimizations is None:
        # The stage table starts from the naive model and prepares stage by stage; the request benchmark compares
        # what a server started with `auto` would have.
        a.optimizations = "none" if a.workload else "auto"
    if a.cmd == "benchmark" and a.workload and a.optimizations != "none":
        p.error("--workload prepares optimisations stage by stage: leave --optimizations unset (or none)")
    if a.cmd == "benchmark" and a.steps is None:
        a.steps = 28 if a.workload else 4
    if a.cmd == "benchmark" and a.runs is None:
        a.runs = 5 if a.workload else 3
    a.fn(a)
