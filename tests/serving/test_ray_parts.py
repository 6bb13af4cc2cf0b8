"""The Ray Serve engine's parts that need no cluster: the RemoteEngine's answers (against a scripted handle), the
deployment options, the metrics merge, the config files in deploy/, and the shared compile cache's lock.

The same behaviour on a real local cluster, with real replicas killed: test_ray_serve.py.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError
from ray.serve.schema import ServeDeploySchema

from kontext_server import engine as eng
from kontext_server.api.metrics import Metrics
from kontext_server.jobs import GenerateJob
from kontext_server.request import InferenceRequest
from kontext_server.service.compile_lock import first_compiler
from kontext_server.service.runner import GenerationResult
from kontext_server.serving.ray_serve import options
from kontext_server.serving.ray_serve.errors import ReplicaLost
from kontext_server.serving.ray_serve.metrics import merge_replica_families
from kontext_server.serving.ray_serve.remote_engine import RemoteEngine
from tests.helpers import ROOT


# ---------------------------------------------------------------------------------------------------------------
# RemoteEngine against a scripted handle: each call replays a list of events, then optionally raises
# ---------------------------------------------------------------------------------------------------------------
class Call:
    def __init__(self, events, raises=None, hang=False):
        self.events, self.raises, self.hang, self.cancelled = list(events), raises, hang, False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for ev in self.events:
            await asyncio.sleep(0.01)
            yield ev
        if self.hang:
            await asyncio.sleep(3600)
        if self.raises is not None:
            raise self.raises

    def cancel(self):
        self.cancelled = True


class ScriptedHandle:
    def __init__(self, *calls: Call):
        self.script, self.sent = list(calls), []

    def options(self, **kw):
        assert kw == {"stream": True}
        return self

    @property
    def run(self):
        return self

    def remote(self, payload, job_id, plan_key):
        self.sent.append((payload, job_id, plan_key))
        return self.script.pop(0)


def result(replica="r2") -> GenerationResult:
    return GenerationResult(images=[], seed=1, width=256, height=256, steps=1, steps_computed=1, steps_skipped=0,
                            timings_ms={"total": 1.0}, optimizations={}, warnings=["w"], replica=replica)


def run_job(handle, payload="p", **kw):
    """Submit one job on a fresh loop and wait (bounded) for its answer: (job, answer or exception, engine)."""
    lost = []
    engine = RemoteEngine(handle, max_queue=4, queue_timeout=kw.pop("queue_timeout", 5),
                          request_timeout=kw.pop("request_timeout", 5), on_replica_lost=lost.append, **kw)

    async def main():
        job = engine.submit(payload, job_id="j1")
        try:
            return job, await asyncio.wait_for(asyncio.wrap_future(job.future), 10), engine, lost
        except Exception as exc:  # noqa: BLE001
            return job, exc, engine, lost

    return asyncio.run(main())


def test_a_result_answers_the_job_and_started_sets_its_start():
    handle = ScriptedHandle(Call([("started", "r1"), ("result", result("r1"))]))
    job, answer, engine, lost = run_job(handle)
    assert isinstance(answer, GenerationResult) and answer.replica == "r1"
    assert job.started_at is not None and not lost
    assert engine.typical_job_seconds() is not None and engine.queue_depth == 0 and engine.in_flight == 0


def test_a_replica_that_dies_before_starting_the_job_gets_it_sent_once_more_and_the_answer_says_so():
    handle = ScriptedHandle(Call([], raises=ActorDiedError()),
                            Call([("started", "r2"), ("result", result("r2"))]))
    job, answer, _, lost = run_job(handle)
    assert isinstance(answer, GenerationResult) and answer.replica == "r2"
    assert len(handle.sent) == 2 and lost == [None]
    assert any("died before starting it; it ran on r2" in w for w in answer.warnings)


def test_a_replica_that_dies_after_starting_the_job_is_a_503_replica_lost_without_a_second_run():
    handle = ScriptedHandle(Call([("started", "r1")], raises=ActorDiedError()), Call([("result", result())]))
    _, answer, engine, lost = run_job(handle)
    assert isinstance(answer, ReplicaLost) and answer.status == 503 and answer.code == "replica_lost"
    assert len(handle.sent) == 1 and lost == ["r1"]
    assert engine.retry_after_seconds() >= 1  # the 503 carries Retry-After (api.errors.engine_error_response)


def test_only_one_retry():
    handle = ScriptedHandle(Call([], raises=ActorDiedError()), Call([], raises=ActorDiedError()),
                            Call([("result", result())]))
    _, answer, _, lost = run_job(handle)
    assert isinstance(answer, ReplicaLost) and len(handle.sent) == 2 and lost == [None, None]


def test_back_pressure_is_a_429_queue_full():
    handle = ScriptedHandle(Call([], raises=BackPressureError(num_queued_requests=4, max_queued_requests=4)))
    _, answer, _, _ = run_job(handle)
    assert isinstance(answer, eng.QueueFull) and answer.status == 429


def test_a_replicas_error_is_the_answer():
    handle = ScriptedHandle(Call([("started", "r1"), ("error", eng.OutOfMemory("oom"))]))
    _, answer, _, _ = run_job(handle)
    assert isinstance(answer, eng.OutOfMemory) and answer.status == 503


def test_a_call_that_ends_without_an_answer_is_a_500():
    handle = ScriptedHandle(Call([("started", "r1")]))
    _, answer, _, _ = run_job(handle)
    assert isinstance(answer, eng.GenerationFailed) and answer.status == 500


def test_a_call_that_never_answers_ends_at_the_deadline(monkeypatch):
    from kontext_server.serving.ray_serve import remote_engine

    monkeypatch.setattr(remote_engine, "DEADLINE_MARGIN_S", 0.0)
    handle = ScriptedHandle(Call([], hang=True))
    t0 = time.monotonic()
    _, answer, _, _ = run_job(handle, queue_timeout=0.2, request_timeout=0.3)
    assert isinstance(answer, eng.RequestTimeout) and time.monotonic() - t0 < 5
    assert handle.sent and not handle.script


def test_cancel_answers_at_once_and_cancels_the_call():
    call = Call([], hang=True)
    engine = RemoteEngine(ScriptedHandle(call), max_queue=4, queue_timeout=5, request_timeout=5)

    async def main():
        job = engine.submit("p")
        await asyncio.sleep(0.1)
        assert engine.queue_depth == 1 and engine.in_flight == 0
        engine.cancel(job, eng.QueueTimeout)
        with pytest.raises(eng.QueueTimeout):
            await asyncio.wait_for(asyncio.wrap_future(job.future), 5)
        await asyncio.sleep(0.1)
        return engine.queue_depth

    assert asyncio.run(main()) == 0 and call.cancelled


def test_a_queue_timeout_does_not_cancel_a_started_job():
    call = Call([("started", "r1"), ("result", result())])
    engine = RemoteEngine(ScriptedHandle(call), max_queue=4, queue_timeout=5, request_timeout=5)

    async def main():
        job = engine.submit("p")
        await asyncio.sleep(0.025)
        engine.cancel(job, eng.QueueTimeout)  # started by now: no effect
        return await asyncio.wait_for(asyncio.wrap_future(job.future), 5)

    assert isinstance(asyncio.run(main()), GenerationResult)


def test_drain_answers_what_is_left_with_shutting_down_and_refuses_new_work():
    engine = RemoteEngine(ScriptedHandle(Call([], hang=True)), max_queue=4, queue_timeout=5,
                          request_timeout=5)

    async def main():
        job = engine.submit("p")
        await asyncio.sleep(0.05)
        finished = await asyncio.to_thread(engine.drain, 0.2)
        with pytest.raises(eng.ShuttingDown):
            engine.submit("p2")
        with pytest.raises(eng.ShuttingDown):
            await asyncio.wait_for(asyncio.wrap_future(job.future), 5)
        return finished

    assert asyncio.run(main()) is False


def test_the_request_crosses_without_its_base64_image_and_with_the_plan_key():
    handle = ScriptedHandle(Call([("result", result())]))
    payload = GenerateJob(InferenceRequest(prompt="x", image="aGVsbG8="), image="decoded", plan={"k": 1})
    run_job(handle, payload=payload, plan_key=lambda: ("key",))
    sent, job_id, key = handle.sent[0]
    assert sent.request.image is None and sent.image == "decoded" and sent.plan == {"k": 1}
    assert payload.request.image == "aGVsbG8=" and job_id == "j1" and key == ("key",)


# ---------------------------------------------------------------------------------------------------------------
# deployment options
# ---------------------------------------------------------------------------------------------------------------
def test_gpu_replicas_get_one_gpu_and_cpu_only_ones_share_the_cores():
    a = options.AppArgs.parse({"replicas": 2, "max_queue": 7, "replica_queue": 1})
    gpu = options.model_options(a, {"CPU": 16, "GPU": 2})
    assert gpu["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1} and gpu["num_replicas"] == 2
    assert gpu["max_ongoing_requests"] == 2 and gpu["max_queued_requests"] == 7
    cpu = options.model_options(a, {"CPU": 2})
    assert cpu["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0}
    one = options.model_options(options.AppArgs.parse({"replicas": 1}), {"CPU": 2})
    assert one["ray_actor_options"]["num_cpus"] == 2


def test_a_context_parallel_replica_asks_for_one_gpu_per_rank():
    a = options.AppArgs.parse({"replicas": 2, "context_parallel": 4})
    assert a.service.context_parallel == 4
    assert options.model_options(a, {"CPU": 16, "GPU": 8})["ray_actor_options"]["num_gpus"] == 4
    assert options.model_options(a, {"CPU": 16})["ray_actor_options"]["num_gpus"] == 0


def test_autoscaling_from_min_and_max_replicas():
    a = options.AppArgs.parse({"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3,
                               "upscale_delay_s": 5, "downscale_delay_s": 60})
    opts = options.model_options(a, {"CPU": 8, "GPU": 4})
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                          "target_ongoing_requests": 3, "upscale_delay_s": 5,
                                          "downscale_delay_s": 60}


@pytest.mark.parametrize("args, message", [
    ({"replicas": 0}, "at least 1"), ({"min_replicas": 3, "max_replicas": 2}, "below"),
    ({"min_replicas": 0, "max_replicas": 2}, "scaling to zero"),
    ({"modle": "tiny"}, "unknown"), ({"device": "cuda:1"}, "own GPU"), ({"warmup": "100x100"}, "warm-up size"),
])
def test_bad_arguments_are_refused_before_anything_starts(args, message):
    with pytest.raises(ValueError, match=message):
        options.AppArgs.parse(args)


def test_the_cli_and_the_config_files_share_one_parser(cache_dir):
    from kontext_server.cli import build_parser

    ns = build_parser().parse_args(["serve", "--engine", "ray", "--replicas", "3", "--model", "tiny",
                                    "--warmup", "256x256,edit:256x256", "--max-queue", "9", "--cache-dir",
                                    str(cache_dir)])
    a = options.AppArgs.parse(options.cli_args(ns))
    assert (a.ray.replicas, a.server.max_queue, a.service.model) == (3, 9, "tiny")
    assert a.service.warmup_sizes == [(256, 256, False), (256, 256, True)]
    assert options.AppArgs.parse(a.as_dict()) == a


# ---------------------------------------------------------------------------------------------------------------
# /metrics: replicas' families merged, labelled
# ---------------------------------------------------------------------------------------------------------------
def test_replica_metrics_merge_into_one_family_each_labelled_by_replica():
    texts = {}
    for rid, n in (("a", 1), ("b", 2)):
        m = Metrics()
        for _ in range(n):
            m.observe_result({"total": 100.0, "transformer": 50.0}, computed=2, skipped=0)
        m.requests.labels("/inference", "200").inc()  # the ingress counts HTTP: a replica's copy is dropped
        texts[rid] = m.render(ready=True).decode()
    families = merge_replica_families(texts)
    names = [f.name for f in families]
    assert len(names) == len(set(names)) and "flux_requests" not in names
    by_name = {f.name: f for f in families}
    counts = {s.labels["replica"]: s.value for s in by_name["flux_stage_seconds"].samples
              if s.name == "flux_stage_seconds_count" and s.labels["stage"] == "total"}
    assert counts == {"a": 1.0, "b": 2.0}
    assert {s.labels["replica"] for s in by_name["flux_ready"].samples} == {"a", "b"}


def test_the_ingress_metrics_text_parses_with_each_family_once():
    from kontext_server.serving.ray_serve.metrics import IngressMetrics

    class Board:
        def replicas(self):
            m = Metrics()
            m.observe_result({"total": 1.0}, 1, 0)
            return [{"id": "r1", "metrics": m.render(ready=True).decode()}]

        def counts(self):
            return {"ready": 1, "loading": 0, "failed": 0, "draining": 0, "total": 1}

    im = IngressMetrics(Board())
    im.requests.labels("/inference", "200").inc()
    text = im.render().decode()
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))
    assert 'flux_replicas{state="ready"} 1.0' in text and 'replica="r1"' in text
    assert 'flux_requests_total{endpoint="/inference",status="200"} 1.0' in text


# ---------------------------------------------------------------------------------------------------------------
# deploy/: the Serve config and the KubeRay manifest build the application
# ---------------------------------------------------------------------------------------------------------------
def serve_configs() -> dict[str, dict]:
    plain = yaml.safe_load((ROOT / "deploy" / "ray-serve.yaml").read_text())
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kuberay-rayservice.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    return {"ray-serve.yaml": plain, "kuberay": yaml.safe_load(service["spec"]["serveConfigV2"])}


@pytest.mark.parametrize("name", ["ray-serve.yaml", "kuberay"])
def test_the_config_files_are_valid_serve_configs_that_build_the_application(name):
    from kontext_server.serving.ray_serve.app import application

    config = ServeDeploySchema.model_validate(serve_configs()[name])
    app = config.applications[0]
    assert app.import_path == "kontext_server.serving.ray_serve.app:build"
    a = options.AppArgs.parse(app.args)
    built = application(a, cluster={"CPU": 64, "GPU": 8})
    assert built is not None
    model = next(d for d in app.deployments if d.name == "FluxModel")
    assert model.ray_actor_options.num_gpus == 1


def test_the_kuberay_manifest_runs_the_same_application_on_the_pinned_ray():
    configs = serve_configs()
    assert configs["kuberay"]["applications"][0]["args"] == configs["ray-serve.yaml"]["applications"][0]["args"]
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kuberay-rayservice.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    pinned = next(line.split("==")[1] for line in (ROOT / "requirements.txt").read_text().splitlines()
                  if line.startswith("ray["))
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == pinned


# ---------------------------------------------------------------------------------------------------------------
# the compile cache shared by processes of one host
# ---------------------------------------------------------------------------------------------------------------
def test_the_first_compiler_leads_and_the_others_wait_for_it_then_go_in_parallel(tmp_path):
    roles, order = {}, []
    leader_in = threading.Event()

    def start(name, hold):
        with first_compiler(tmp_path, wait_s=10, poll_s=0.02) as info:
            roles[name] = info
            order.append(("in", name, time.monotonic()))
            if name == "a":
                leader_in.set()
            time.sleep(hold)
            order.append(("out", name, time.monotonic()))

    a = threading.Thread(target=start, args=("a", 0.5))
    a.start()
    leader_in.wait(5)
    others = [threading.Thread(target=start, args=(n, 0.3)) for n in ("b", "c")]
    for t in others:
        t.start()
    for t in [a, *others]:
        t.join(10)
    assert roles["a"]["role"] == "leader"
    assert roles["b"]["role"] == roles["c"]["role"] == "follower" and roles["b"]["waited_s"] > 0.2
    t = {(ev, n): ts for ev, n, ts in order}
    assert t[("in", "b")] >= t[("out", "a")] and t[("in", "c")] >= t[("out", "a")]  # waited for the leader
    assert t[("in", "c")] < t[("out", "b")] and t[("in", "b")] < t[("out", "c")]  # then together


def test_a_follower_never_waits_longer_than_its_limit(tmp_path):
    with first_compiler(tmp_path, wait_s=10) as lead:
        t0 = time.monotonic()
        with first_compiler(tmp_path, wait_s=0.3, poll_s=0.05) as follower:
            assert time.monotonic() - t0 < 2
    assert lead["role"] == "leader" and follower["role"] == "follower"
    assert "still compiling" in follower["detail"]


def test_an_unlockable_directory_runs_unlocked(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with first_compiler(blocker / "sub", wait_s=1) as info:
        assert info["role"] == "unlocked"


def test_two_replicas_saving_the_mega_cache_at_once_leave_one_whole_file(tmp_path, monkeypatch):
    import torch

    from optimizations.compiling.cache import CompileCache

    payloads = [bytes([i]) * 4_000_000 for i in range(1, 9)]
    calls = iter(payloads * 3)  # eight writers, three saves each
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (next(calls), None))
    caches = [CompileCache(tmp_path, "k") for _ in payloads]
    errors = []

    def save(cache):
        try:
            for _ in range(3):
                cache._file_current = False  # as if each save had compiled something new
                cache.save()
        except Exception as exc:  # noqa: BLE001 - a writer that fails is what this test looks for
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(c,)) for c in caches]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert not errors
    data = (tmp_path / "mega-cache-k.bin").read_bytes()
    assert data in payloads  # one writer's whole file, never an interleaving
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------------------
# Ray stays optional
# ---------------------------------------------------------------------------------------------------------------
def test_the_ingress_lists_the_adapters_a_replica_reports_that_can_run_and_none_before_a_report():
    """GET /v1/models on the ingress (no model there): the adapters of a replica's `lora.library`, less those that
    cannot run or are fused already."""
    from kontext_server.service.config import ServiceConfig
    from kontext_server.serving.ray_serve.remote_service import RemoteService

    class Board:
        report = None

        def any_report(self):
            return self.report

    board = Board()
    remote = RemoteService(ServiceConfig(model="tiny", device="cpu"), board)
    assert remote.lora_names() == []
    board.report = {"health": {"lora": None}}  # replicas without a LoRA directory
    assert remote.lora_names() == []
    board.report = {"health": {"lora": {"library": {
        "big": {"error": "rank 16 is larger than the slots' rank 8 (--lora-max-rank)"},
        "light": {"rank": 8, "targets": 22}, "style": {"rank": 4, "targets": 22},
        "studio": {"rank": 4, "targets": 22, "fused": True}}}}}
    assert remote.lora_names() == ["light", "style"]


def test_the_local_server_and_the_clis_help_do_not_import_ray():
    code = ("import sys\n"
            "from kontext_server.cli import build_parser\n"
            "try:\n    build_parser().parse_args(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
            "import flux_kontext_optimized, kontext_server.api.app, kontext_server.serving.ray_serve.options\n"
            "from kontext_server.service import FluxService\n"
            "print('RAY' if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 'NO-RAY')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "NO-RAY"


def test_only_the_ray_serve_package_imports_ray():
    for path in sorted(Path(ROOT).glob("*.py")) + sorted((ROOT / "kontext_server").rglob("*.py")):
        if "ray_serve" in path.parts:
            continue
        text = path.read_text()
        assert "import ray" not in text and "from ray" not in text, path
