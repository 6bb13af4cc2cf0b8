"""Every environment variable the server reads or sets, declared once (the one module that touches os.environ).

What: each variable is an `EnvVar` with its name, default, group and one line of help; `docs/operations.md` holds
the table `markdown_table()` renders (a test keeps the two equal). The CLI's defaults come from here, so a flag and
its variable can never disagree.
Why here: vLLM's `envs.py` pattern. One reader means one place to document, test and audit (no secrets are logged:
`HF_TOKEN` is read only where the hub needs it).
Contract: `get()` reads the environment at call time (tests change variables per test; the server reads each at
start-up); `set_process_env` is for the variables the server itself exports for libraries that read them
(cuBLASLt, inductor). Stdlib only: the bytecode cache and cuBLASLt settings read this before torch is imported.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

_ALL: list["EnvVar"] = []


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str | None
    group: str
    help: str
    documented: bool = True  # False: set by the server for a library, or read for a library, not a user setting

    def __post_init__(self):
        _ALL.append(self)

    def get(self) -> str | None:
        return os.environ.get(self.name, self.default)

    def get_int(self) -> int:
        return int(self.get())

    def get_float(self) -> float:
        return float(self.get())

    def is_set(self) -> bool:
        return self.name in os.environ

    def off(self) -> bool:
        """A switch turned off: its variable, or unset its default (on unless declared "0"), is "0"."""
        return os.environ.get(self.name, self.default or "1") == "0"


# ---- serving --------------------------------------------------------------------------------------------------------
MODEL = EnvVar("FLUX_MODEL", "tiny", "model", "tiny | synthetic-full | a hub id | a local diffusers directory")
TRANSFORMER = EnvVar("FLUX_TRANSFORMER", None, "model",
                     "a single .safetensors transformer in Black Forest Labs' layout (bf16, or fp8 e4m3 with or "
                     "without scales); the rest of the pipeline comes from FLUX_MODEL")
DEVICE = EnvVar("FLUX_DEVICE", None, "model", "cuda, cuda:1 or cpu (default: cuda when available)")
OPTIMIZATIONS = EnvVar("FLUX_OPTIMIZATIONS", "auto", "model",
                       "optimisations prepared at start-up: auto | all | none | a comma list of registry names")
COMPILE_MODE = EnvVar("FLUX_COMPILE_MODE", "default", "model", "torch.compile mode")
COMPILE_SCOPE = EnvVar("FLUX_COMPILE_SCOPE", "regional", "model",
                       "regional (each transformer block) or full (one graph; no first-block cache)")
INDUCTOR_FLAGS = EnvVar("FLUX_INDUCTOR_FLAGS", "light", "model",
                        "inductor preset: none | light | seed (seed adds coordinate-descent tuning: slow compiles)")
CACHE_DIR = EnvVar("FLUX_CACHE_DIR", None, "model",
                   "tiny model, compile artifacts, inductor kernels, Python bytecode "
                   "(default ~/.cache/flux-kontext-server); keep it on a volume that survives restarts")
WARMUP_SIZES = EnvVar("FLUX_WARMUP_SIZES", None, "model",
                      "shapes compiled / captured before ready: WxH (text-to-image) or edit:WxH, comma-separated")
NEW_SHAPES = EnvVar("FLUX_NEW_SHAPES", "compile", "model",
                    "a request at a shape not warmed up: compile it then (compile) or run it uncompiled (eager)")
COMPILE_LOCK_WAIT = EnvVar("FLUX_COMPILE_LOCK_WAIT", "1800", "model",
                           "seconds a start waits while another process compiles into the same cache directory "
                           "(then loads its artifacts; after the wait it compiles itself)")
CONTEXT_PARALLEL = EnvVar("FLUX_CONTEXT_PARALLEL", "1", "model",
                          "ranks one request is split over (context parallelism): N processes on this host, one GPU "
                          "each (N CPU processes on the gloo backend without GPUs); rank 0 serves, the others follow")
CP_RING_DEGREE = EnvVar("FLUX_CP_RING_DEGREE", "1", "model",
                        "context parallelism: ranks of ring attention (GPU only); the rest split heads (Ulysses)")
CP_TIMEOUT = EnvVar("FLUX_CP_TIMEOUT", "300", "model",
                    "context parallelism: seconds a collective waits for the other ranks before the request fails "
                    "(503) and the group is reported broken")
MEMORY_BUDGET = EnvVar("FLUX_MEMORY_BUDGET", None, "model",
                       "GPU memory the model may use, e.g. 24GB, 16GB (GB = GiB) or auto (the device's free memory): "
                       "what does not fit is offloaded to host memory and streamed in (docs/operations.md, memory "
                       "tiers); unset: everything on the GPU")
CP_FAIL_AT = EnvVar("FLUX_CP_FAIL_AT", None, "model",
                    "tests only: RANK:TEXT[:inside] makes that rank fail a generation whose prompt contains TEXT, "
                    "after its first step (or inside its first transformer call)",
                    documented=False)
LORA_DIR = EnvVar("FLUX_LORA_DIR", None, "lora",
                  "directory of LoRA adapters: each .safetensors file one adapter, named by its stem "
                  "(read at start-up)")
LORA_PRELOAD = EnvVar("FLUX_LORA_PRELOAD", None, "lora", "adapters loaded onto the device at start-up, comma-separated")
MAX_LORAS = EnvVar("FLUX_MAX_LORAS", "8", "lora",
                   "adapters kept loaded on the device (least recently used leave first)")
LORA_MAX_RANK = EnvVar("FLUX_LORA_MAX_RANK", None, "lora",
                       "rank of the adapter slots (default: the largest rank in the directory); larger adapters: 422")
LORA_FUSE = EnvVar("FLUX_LORA_FUSE", None, "lora",
                   "NAME or NAME:SCALE: one adapter fused into the weights at start-up (zero overhead; every request "
                   "runs it)")
LORA_EXACT_MERGE = EnvVar("FLUX_LORA_EXACT_MERGE", "auto", "lora",
                          "auto | 1 | 0: an exact-tier request's LoRA adapters merged into the bf16 weights (restored "
                          "bit for bit from a copy of the block linears kept on the device) instead of the branch "
                          "beside each GEMM; auto: where a CUDA device has room for the copies and 12 GiB besides")
HOST = EnvVar("FLUX_HOST", "127.0.0.1", "server", "listen address")
PORT = EnvVar("FLUX_PORT", "8000", "server", "listen port")
MAX_QUEUE = EnvVar("FLUX_MAX_QUEUE", "16", "server", "requests that may wait beside the running one (then 429)")
QUEUE_TIMEOUT = EnvVar("FLUX_QUEUE_TIMEOUT", "120", "server", "seconds a request may wait in the queue (then 503)")
REQUEST_TIMEOUT = EnvVar("FLUX_REQUEST_TIMEOUT", "600", "server",
                         "seconds a generation may run before it is stopped at its next step (504)")
SHUTDOWN_GRACE = EnvVar("FLUX_SHUTDOWN_GRACE", "30", "server",
                        "seconds running and queued work gets after SIGTERM before it is answered 503")
DRAIN_SECONDS = EnvVar("FLUX_DRAIN_SECONDS", "5", "server",
                       "seconds the listener stays open after SIGTERM, answering /health and new work with 503, "
                       "so load balancers see the drain (0: close at once)")
API_KEYS = EnvVar("FLUX_API_KEYS", None, "server",
                  "file of API keys, one per line or sha256:<hex> (# comments): when set, every route but /health, "
                  "/live and /metrics needs a key (Authorization: Bearer or x-key)")
RATE_LIMIT = EnvVar("FLUX_RATE_LIMIT", None, "server",
                    "per-key limit N/UNIT[,C]: N requests per s, min or h and at most C concurrent jobs, e.g. 60/min,2 "
                    "(then 429 with Retry-After)")
METRICS_KEY_REQUIRED = EnvVar("FLUX_METRICS_KEY_REQUIRED", "0", "server", "1: /metrics needs an API key too")
SERVED_MODEL_NAME = EnvVar("FLUX_SERVED_MODEL_NAME", None, "server",
                           "the model id of the /v1 routes (GET /v1/models, a request's model); default: --model")
# ---- async jobs, outputs, URL inputs, webhooks -----------------------------------------------------------------------
DATA_DIR = EnvVar("FLUX_DATA_DIR", None, "jobs",
                  "the job store (SQLite), stored outputs and the URL-signing key (default: <cache dir>-data beside "
                  "the cache directory); one server per directory")
RESULT_TTL = EnvVar("FLUX_RESULT_TTL", "3600", "jobs",
                    "seconds a finished job, its result and its output files are kept (then deleted; at most 7 days)")
ON_RESTART = EnvVar("FLUX_ON_RESTART", "run", "jobs",
                    "pending jobs found at start-up: run them (run) or mark them Error \"interrupted by restart\" "
                    "(error); a job that was running is always marked Error")
MAX_JOBS = EnvVar("FLUX_MAX_JOBS", "10000", "jobs", "jobs the store may hold (pending + unexpired results; then 429)")
SWEEP_INTERVAL = EnvVar("FLUX_SWEEP_INTERVAL", "60", "jobs", "seconds between two sweeps of expired jobs and files")
OUTPUT_STORE = EnvVar("FLUX_OUTPUT_STORE", "local", "jobs",
                      "where output images go: local (files under the data directory, signed /v1/files URLs) or "
                      "s3://bucket/prefix (presigned URLs)")
S3_ENDPOINT_URL = EnvVar("FLUX_S3_ENDPOINT_URL", None, "jobs",
                         "an S3-compatible endpoint (Cloudflare R2, MinIO); default AWS S3. Credentials: the usual "
                         "AWS_* variables")
PUBLIC_URL = EnvVar("FLUX_PUBLIC_URL", None, "jobs",
                    "the base URL clients reach this server at, for polling_url and /v1/files URLs (default: the "
                    "request's own scheme and host)")
ALLOW_PRIVATE_URLS = EnvVar("FLUX_ALLOW_PRIVATE_URLS", "0", "jobs",
                            "1: image URLs and webhook URLs may point at private, loopback, link-local and metadata "
                            "addresses (tests, private networks)")
URL_FETCH_TIMEOUT = EnvVar("FLUX_URL_FETCH_TIMEOUT", "20", "jobs", "seconds an image URL may take, redirects included")
WEBHOOK_RETRY_DELAYS = EnvVar("FLUX_WEBHOOK_RETRY_DELAYS", "1,5,30", "jobs",
                              "seconds before each retry of a failed webhook delivery (comma-separated)")
WEBHOOK_TIMEOUT = EnvVar("FLUX_WEBHOOK_TIMEOUT", "10", "jobs", "seconds one webhook delivery attempt may take")
PROVENANCE_METADATA = EnvVar("FLUX_PROVENANCE_METADATA", "1", "provenance",
                             "0: no EXIF / PNG text saying the image is AI-generated (Software, Make, Model)")
PROVENANCE_PROMPT = EnvVar("FLUX_PROVENANCE_PROMPT", "0", "provenance",
                           "1: also the prompt in that metadata (EXIF ImageDescription, PNG Description)")
C2PA_CERT = EnvVar("FLUX_C2PA_CERT", None, "provenance",
                   "PEM certificate chain (signing certificate first): with FLUX_C2PA_KEY, every image carries a "
                   "signed C2PA manifest (c2pa.created, trainedAlgorithmicMedia)")
C2PA_KEY = EnvVar("FLUX_C2PA_KEY", None, "provenance", "PEM private key of FLUX_C2PA_CERT's signing certificate")
SAFETY_CHECKER = EnvVar("FLUX_SAFETY_CHECKER", None, "provenance",
                        "module:callable called with (prompt, images) before and after each generation; None or "
                        "True allows, False or a reason string blocks (none ships)")
LOG_LEVEL = EnvVar("FLUX_LOG_LEVEL", "INFO", "server", "Python log level of the server's loggers")
BENCH_DIR = EnvVar("FLUX_BENCH_DIR", "benchmarks/latest", "server", "where `benchmark` writes its JSON and chart")
ENGINE = EnvVar("FLUX_ENGINE", "local", "server",
                "local (this process serves one device) or ray (Ray Serve model replicas behind one ingress)")

# ---- --engine ray (kontext_server/serving/ray; docs/operations.md, "Scaling out with Ray Serve") -------------------
REPLICAS = EnvVar("FLUX_REPLICAS", "1", "ray", "model replicas, a fixed count (FLUX_MIN_REPLICAS / FLUX_MAX_REPLICAS: "
                  "autoscale instead)")
MIN_REPLICAS = EnvVar("FLUX_MIN_REPLICAS", None, "ray", "autoscaling: the fewest model replicas (at least 1)")
MAX_REPLICAS = EnvVar("FLUX_MAX_REPLICAS", None, "ray", "autoscaling: the most model replicas")
TARGET_ONGOING_REQUESTS = EnvVar("FLUX_TARGET_ONGOING_REQUESTS", "2", "ray",
                                 "autoscaling: requests running and queued per replica that the autoscaler aims at")
UPSCALE_DELAY = EnvVar("FLUX_UPSCALE_DELAY", "30", "ray", "autoscaling: seconds of high load before adding a replica")
DOWNSCALE_DELAY = EnvVar("FLUX_DOWNSCALE_DELAY", "600", "ray",
                         "autoscaling: seconds of low load before removing a replica")
REPLICA_QUEUE = EnvVar("FLUX_REPLICA_QUEUE", "1", "ray",
                       "requests a replica holds beside the running one (its max_ongoing_requests is 1 + this); "
                       "the rest wait in the ingress's shared queue of FLUX_MAX_QUEUE")
REPLICA_CPUS = EnvVar("FLUX_REPLICA_CPUS", None, "ray",
                      "CPUs reserved per replica (default: 1 with GPUs; without, the cluster's CPUs / replicas)")
REPLICA_GPUS = EnvVar("FLUX_REPLICA_GPUS", None, "ray",
                      "GPUs per replica (default: 1 where the cluster has GPUs, else 0)")

# ---- start-up --------------------------------------------------------------------------------------------------------
BYTECODE_CACHE = EnvVar("FLUX_BYTECODE_CACHE", "1", "start-up",
                        "0: do not keep Python's bytecode under the cache directory on images that do not keep it")
SHOW_LIBRARY_NOISE = EnvVar("FLUX_SHOW_LIBRARY_NOISE", "0", "start-up",
                            "1: show the known-harmless library messages the server drops at start-up "
                            "(docs/operations.md)")
CUBLASLT_NO_WORKSPACE = EnvVar("FLUX_CUBLASLT_NO_WORKSPACE", "1", "start-up",
                               "0: keep torch's cuBLASLt workspace (the server sets CUBLASLT_WORKSPACE_SIZE=0)")

# ---- A/B switches of code the compiled graphs contain (all on unless "0"; part of the compile-cache key) -------------
AOT_REGIONS = EnvVar("FLUX_AOT_REGIONS", "1", "switch",
                     "0: compiled blocks are traced by dynamo on every start instead of saved whole")
AOT_VAE = EnvVar("FLUX_AOT_VAE", "1", "switch", "0: the VAE is compiled by dynamo instead of saved whole")
FP8_SPLIT_PROJ_OUT = EnvVar("FLUX_FP8_SPLIT_PROJ_OUT", "1", "switch",
                            "0: the fp8 single blocks call proj_out on the concatenation")
FP8_FUSED_GELU = EnvVar("FLUX_FP8_FUSED_GELU", "1", "switch", "0: no fused GELU + fp8 quantisation kernel")
FP8_FUSED_NORM = EnvVar("FLUX_FP8_FUSED_NORM", "1", "switch",
                        "0: no fused norm / attention-output fp8 quantisation kernels")
FP8_PLAIN_LINEARS = EnvVar("FLUX_FP8_PLAIN_LINEARS", "1", "switch", "0: keep torchao's tensor-subclass linears")
BF16_GELU_EPILOGUE = EnvVar("FLUX_BF16_GELU_EPILOGUE", "1", "switch", "0: no GELU in cuBLASLt's epilogue (exact tier)")
BF16_SPLIT_PROJ_OUT = EnvVar("FLUX_BF16_SPLIT_PROJ_OUT", "1", "switch",
                             "0: the exact tier's single blocks call proj_out on the concatenation")
LORA_FUSED_BRANCH = EnvVar("FLUX_LORA_FUSED_BRANCH", "1", "switch",
                           "0: LoRA adapters run as a side branch beside each GEMM instead of inside it (their "
                           "down-projection rows appended under the weight, the update added in place); slower, "
                           "measured in BENCHMARKS.md")
LORA_FP8_MERGE = EnvVar("FLUX_LORA_FP8_MERGE", "1", "switch",
                        "0: an fp8-tier request's LoRA adapters run the branch beside each GEMM, as the exact tier's "
                        "do, instead of being merged into the fp8 copy's weights (re-quantised from the exact weights "
                        "when the adapters change, restored bit for bit after): the branch costs every step, the "
                        "merge only a change of adapters (BENCHMARKS.md)")
LORA_SWITCH_GRAPHS = EnvVar("FLUX_LORA_SWITCH_GRAPHS", "0", "switch",
                            "1: on a GPU, a LoRA switch recorded once (the same adapters as an earlier one) replays "
                            "its slot writes as one CUDA graph per set of scales instead of one launch per block; off "
                            "until its GPU test has run")
ATTENTION_SEQ_MAJOR = EnvVar("FLUX_ATTENTION_SEQ_MAJOR", "0", "switch",
                             "1: the fused q/k norm + RoPE kernel writes q, k, v in (batch, seq, heads, head_dim) "
                             "memory and cuDNN attention runs on strided views of it, so its output reaches the "
                             "out-projection without a permute copy; off: on an H100 it removed the copy, but no time "
                             "that an A/B could tell from noise (BENCHMARKS.md)")
# Switches that change the compiled code: each is part of the compile-cache key and the benchmark's record.
CODE_SWITCHES = (FP8_SPLIT_PROJ_OUT, FP8_FUSED_GELU, FP8_FUSED_NORM, FP8_PLAIN_LINEARS, BF16_GELU_EPILOGUE,
                 BF16_SPLIT_PROJ_OUT, LORA_FUSED_BRANCH, ATTENTION_SEQ_MAJOR)

# ---- read or set for libraries -------------------------------------------------------------------------------------
HF_TOKEN = EnvVar("HF_TOKEN", None, "library", "Hugging Face token for the gated FLUX.1-Kontext-dev repository")
HF_TOKEN_LEGACY = EnvVar("HUGGING_FACE_HUB_TOKEN", None, "library", "older name of HF_TOKEN", documented=False)
HF_HUB_OFFLINE = EnvVar("HF_HUB_OFFLINE", None, "library",
                        "1: never contact the Hugging Face Hub; a hub id is loaded from the local cache")
HF_HUB_CACHE = EnvVar("HF_HUB_CACHE", None, "library",
                      "the Hugging Face cache a hub id is found in (default: huggingface_hub's, "
                      "~/.cache/huggingface/hub)")
AWS_ACCESS_KEY_ID = EnvVar("AWS_ACCESS_KEY_ID", None, "library",
                           "with an s3:// output store: boto3's credentials (with AWS_SECRET_ACCESS_KEY; or any "
                           "other source boto3 reads)")
AWS_REGION = EnvVar("AWS_DEFAULT_REGION", None, "library", "with an s3:// output store: the bucket's region")
CUBLASLT_WORKSPACE_SIZE = EnvVar("CUBLASLT_WORKSPACE_SIZE", None, "library",
                                 "cuBLASLt's workspace in KiB; the server sets 0 unless you set it")
INDUCTOR_CACHE_DIR = EnvVar("TORCHINDUCTOR_CACHE_DIR", None, "library",
                            "inductor's kernel cache; the server puts it under the cache directory unless you set it")
RAY_ADDRESS = EnvVar("RAY_ADDRESS", None, "library",
                     "the Ray cluster `serve --engine ray` joins (unset: it starts a local one)")
RAY_WORKER_NICENESS = EnvVar("RAY_worker_niceness", None, "library",
                             "Ray's priority for its workers (the replicas, the ingress), read where the cluster "
                             "starts: nice 15 unless set; 0 where other processes compete for the CPUs")
CUDA_VISIBLE_DEVICES = EnvVar("CUDA_VISIBLE_DEVICES", None, "library",
                              "which GPUs the process sees (the clock sampler maps it to nvidia-smi's ids)")
PYTHON_DONT_WRITE_BYTECODE = EnvVar("PYTHONDONTWRITEBYTECODE", None, "library",
                                    "set on images that keep no bytecode: the server then keeps its own",
                                    documented=False)


def default_cache_dir() -> Path:
    """FLUX_CACHE_DIR, or ~/.cache/flux-kontext-server."""
    value = CACHE_DIR.get()
    return Path(value) if value else Path.home() / ".cache" / "flux-kontext-server"


def default_data_dir(cache_dir: str | Path | None = None) -> Path:
    """FLUX_DATA_DIR, or `<cache dir>-data` beside the cache directory (jobs and outputs are not a cache)."""
    value = DATA_DIR.get()
    if value:
        return Path(value)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return cache.parent / (cache.name + "-data")


def is_true(var: EnvVar) -> bool:
    """A boolean variable as huggingface_hub reads its own: 1, true, yes or on (any case)."""
    return (var.get() or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def code_switches() -> dict[str, str]:
    """The code switches set away from their default in this process, as "0" (off) or "1" (on) (recorded by
    benchmarks, part of the compile-cache key). Only those: a switch at its default runs the same code as unset."""
    return {v.name: "0" if v.off() else "1" for v in CODE_SWITCHES if v.off() != (v.default == "0")}


def replica_env() -> dict[str, str]:
    """The documented FLUX_* variables set in this process: what Ray Serve replicas, possibly on other hosts, need
    to run the same code (the code switches above are read where they act, not passed in the service's config).
    Library variables (HF_TOKEN above all: a secret) are not included; the cluster's own environment provides them."""
    return {v.name: os.environ[v.name] for v in _ALL if v.documented and v.name.startswith("FLUX_")
            and v.name in os.environ}


def set_process_env(var: EnvVar, value: str) -> None:
    """Export a variable for a library that reads it from the environment (cuBLASLt, inductor), for the rest of the
    process."""
    os.environ[var.name] = value


@contextlib.contextmanager
def process_env_set(var: EnvVar, value: str):
    """`var` set to `value` in this process for the duration of the block, then as it was (a tool that runs the
    server's code in-process with a switch set, inside a test run: tools/bench_lora.py)."""
    before = os.environ.get(var.name)
    os.environ[var.name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(var.name, None)
        else:
            os.environ[var.name] = before


def environ_with(**overrides: str) -> dict[str, str]:
    """This process's environment with overrides: the environment of a child process (tools, tests)."""
    return {**os.environ, **overrides}


def all_vars() -> list[EnvVar]:
    return list(_ALL)


def markdown_table() -> str:
    """The table of docs/operations.md: every documented variable, its default and what it does."""
    rows = ["| variable | default | group | what it does |", "|---|---|---|---|"]
    for v in _ALL:
        if v.documented:
            text = v.help.replace("|", "\\|")  # a literal bar inside a cell
            rows.append(f"| `{v.name}` | {f'`{v.default}`' if v.default is not None else '-'} | {v.group} | {text} |")
    return "\n".join(rows)
