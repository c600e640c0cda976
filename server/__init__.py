"""gradwatch server: ingest, detectors, alerts and metrics. Never imports torch.

Module map (dependencies point down the list):
  app           composition root: ServerApp (gRPC + HTTP threads), serve() for `gradwatch serve`
  grpc_service  gradwatch.v1.Ingest on grpc.aio (raw-bytes handlers), health, reflection
  relay         two tiers, relay side (`serve --upstream`): the forwarder of compact records, per-rank verdicts
                and incidents with its bounded buffer; relay_link: one upstream link (stream, batches, acks)
  upstream      two tiers, aggregator side: the Ingest.Relay handler, relayed sessions, the relay limit;
                relay_coalesce: every relay's columns kept briefly and applied per run as one batch
  relay_columns relayed reports as packed columns (RelayedColumns): packed by a link, read with numpy;
                relay_sessions: an aggregator stream's sessions as arrays (checks, duplicates); ingest_batch:
                relayed columns of a run applied as one batch; step_pending: per-step bookkeeping for batches
  fanout        the read API and the pages answered for every replica (cluster.peers over the headless Service)
  logs          the console: timestamped, levelled log lines as text or JSON (`gradwatch serve`)
  http_api      /metrics, /healthz, /api/v1/{runs,alerts,notifications,silences} (aiohttp, on its own loop thread)
  pages         HTML: the overview (/) and incident reports (/incidents/ID), rendered by gradwatch.incident_report
  metrics       the Prometheus Collector, built from the state at scrape time
  notify        Notifier: alert transitions -> notifications (resend, resolve, inhibition, silences)
  render        labels, annotations and links of an alert as a pager shows them
  silences      SilenceBook: per-run (optionally per-detector) silences from the JSON API
  silences_api  the silences routes; with peers, each silence kept, ended and listed on every replica
  sinks/        AlertSink implementations (Alertmanager, webhook, log, in-memory) and SinkWorker
  rules         Prometheus/Grafana rules as data (rendered into deploy/ by scripts/gen_deploy.py)
  views         JSON-safe dicts of runs for the API
  query_api     /api/v1 runs, ranks, series, alerts, incidents with pagination and filters
  persistence   StateKeeper: run registry and alerts to the database, restored at start-up
  recorder      FlightRecorder: bounded per-rank windows frozen into incidents when an alert fires, and the
                writer thread that stores them; incident_window: the entries an incident keeps and its .npz;
                provenance: what went wrong first; incident_metrics: the recorder's and storage's counters
  database      Database: SQLite (runs, alerts, incidents), retention with counters
  ingest        Ingestor: applies validated frames to store, detectors, alerts (transport-free)
  autopsy       the batch a spike or NaN alert names (batch ids, top samples by loss)
  limits        run bindings, per-stream byte budgets, HTTP request bounds
  auth          bearer-token grants and the HTTP guard; tls: TLS material, reloaded when the files change;
                sessions: the pages' login sessions (cookie, CSRF) when tokens are on; sessions_api: a
                session opened on one replica honoured and ended on the others
  alerts        AlertBook: one alert per (run, detector), ranks merged, bounded history, listeners
  store         RunStore: bounded runs and ranks, numpy rings, latest per-layer columns
  ranktable     RankTable: every rank's latest state as numpy arrays, what cross-rank detectors read;
                collectives: each rank's collective progress (CollectiveBoard)
  stats         the server's own counters (frames, rejections, duplicates, streams, latency)
  validate      every rejection: status code, reason label, message
  report        RankReport: a decoded StepReport shared by store and detectors
  detectors/    one module per detector, all listed in detectors.REGISTRY
  config        ServerConfig, the YAML loader, the GRADWATCH_* environment variables
  settings      re-exports gradwatch.settings (setting(), Settings, the loader); ring: fixed-size numpy rings
"""
