"""Where a Ray Serve request's time goes on this machine: the pieces of the Ray path, one trivial route each.

    .venv/bin/python benchmarks/2026-12-06-cpu-ray-serve/probe_path.py

A FastAPI ingress (2 model replicas behind it, every actor num_cpus 0) with routes that each add one piece: answering
itself through Serve's proxy (`local`), awaiting a unary call (`unary`), a call streamed as three or two items (`s3`,
`s2`), a 200 KB response body through the proxy (`bigresp`), a 200 KB result from the model (`bigfrommodel`). 55
rounds, each calling every route once; the first 5 untimed; p50 of the client's wall time in ms.
"""
import json
import statistics
import time

import httpx
import ray
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve

ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": 8769})
app = FastAPI()
BIG = "x" * 200_000


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0})
class Model:
    def __call__(self, body):
        return {"ok": True}

    async def stream3(self, body):
        yield ("accepted", 1)
        yield ("started", None)
        yield ("result", {"ok": True})

    async def stream2(self, body):
        yield ("started", None)
        yield ("result", {"ok": True})

    def big(self, body):
        return {"ok": True, "img": b"\0" * 200_000}


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress:
    def __init__(self, m):
        self.m, self.s = m, m.options(stream=True)

    @app.post("/unary")
    async def unary(self, body: dict):
        return await self.m.remote(body)

    @app.post("/s3")
    async def s3(self, body: dict):
        return {"n": len([ev async for ev in self.s.stream3.remote(body)])}

    @app.post("/s2")
    async def s2(self, body: dict):
        return {"n": len([ev async for ev in self.s.stream2.remote(body)])}

    @app.post("/bigresp")
    async def bigresp(self, body: dict):
        await self.m.remote(body)
        return JSONResponse({"img": BIG})

    @app.post("/bigfrommodel")
    async def bigfrommodel(self, body: dict):
        return {"n": len((await self.m.big.remote(body))["img"])}

    @app.post("/local")
    async def local(self, body: dict):
        return {"ok": True}


serve.run(Ingress.bind(Model.bind()), name="t", route_prefix="/")
names = ["local", "unary", "s3", "s2", "bigresp", "bigfrommodel"]
times = {n: [] for n in names}
with httpx.Client(base_url="http://127.0.0.1:8769", timeout=60) as c:
    for r in range(55):
        for n in names:
            t0 = time.perf_counter()
            c.post("/" + n, json={"seed": 1})
            if r >= 5:
                times[n].append((time.perf_counter() - t0) * 1000)
print(json.dumps({"p50_ms": {n: round(statistics.median(v), 2) for n, v in times.items()}}))
serve.shutdown()
ray.shutdown()
