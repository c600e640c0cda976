"""gradwatch server: ingest, detectors, alerts and metrics. Never imports torch.

Module map (dependencies point down the list):
  app           composition root: ServerApp (gRPC + HTTP threads), serve() for `gradwatch serve`
  grpc_service  gradwatch.v1.Ingest on grpc.aio (raw-bytes handlers), health, reflection
  http_api      /metrics, /healthz, /api/v1/runs, /api/v1/alerts (stdlib ThreadingHTTPServer)
  metrics       the Prometheus Collector, built from the state at scrape time
  views         JSON-safe dicts of runs for the API
  ingest        Ingestor: applies validated frames to store, detectors, alerts (transport-free)
  alerts        AlertBook: one alert per (run, detector), ranks merged, bounded history, listeners
  store         RunStore: bounded runs and ranks, numpy rings, latest per-layer columns
  stats         the server's own counters (frames, rejections, duplicates, streams, latency)
  validate      every rejection: status code, reason label, message
  report        RankReport: a decoded StepReport shared by store and detectors
  detectors/    one module per detector, all listed in detectors.REGISTRY
  config        ServerConfig, the YAML loader, the GRADWATCH_* environment variables
  settings      typed, range-checked settings dataclasses; ring: fixed-size numpy rings
"""
