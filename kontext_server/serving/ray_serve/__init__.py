"""The server on Ray Serve: model replicas on one or many GPUs and machines, behind one ingress serving the same app.

    flux_kontext_optimized.py serve --engine ray --replicas 2          # one command (starts a local Ray if none)
    serve deploy deploy/ray-serve.yaml                                  # a running Ray cluster
    kubectl apply -f deploy/kuberay-rayservice.yaml                     # Kubernetes, through KubeRay

Three deployments (app.py builds them from one set of arguments, so the CLI and the config files agree):

- FluxModel (replica.py): one FluxService (the same load, optimise, generate) with its own local Engine, one per GPU.
  Its `max_ongoing_requests` is 1 running + FLUX_REPLICA_QUEUE queued; `check_health` fails unless it is ready.
- FluxIngress (ingress.py): the same FastAPI app as the local server (api.app.build_app) given a RemoteEngine
  (remote_engine.py: jobs go to the replicas through a DeploymentHandle; Ray's `max_queued_requests` is the shared
  queue, and its BackPressureError the 429) and a RemoteService (remote_service.py: plans on the ingress, reports
  health from what the replicas report).
- FluxStatus (status.py): where each replica reports its state, health and metrics every second; the ingress reads it
  for /health (the ready count) and /metrics (ours, labelled by replica).

Only this package imports ray; importing `kontext_server.serving.ray_serve` itself imports nothing heavy.
"""
