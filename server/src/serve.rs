//! `moe-serve serve`: load the model, start the engine thread, serve HTTP
//! until SIGTERM / Ctrl-C, then drain within the grace period.

use crate::config::ServeConfig;
use crate::grpc;
use crate::http::{self, AppState, ChatTemplate, Ready};
use crate::model_dir::default_model_dir;
use crate::offload::load_served;
use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use moe_engine::{metric_names as m, spawn_engine, EngineCore, EngineLimits};
use moe_scheduler::SchedulerConfig;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How often histogram samples are folded into the metrics (bounds their memory).
const METRICS_UPKEEP: Duration = Duration::from_secs(1);

/// Installs the global Prometheus recorder (once per process), with its upkeep thread.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: std::sync::Mutex<Option<PrometheusHandle>> = std::sync::Mutex::new(None);
    let mut h = HANDLE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(h) = h.as_ref() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), m::LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Prefix("moe_step_batch".into()), m::BATCH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(m::DISTINCT_EXPERTS.into()), m::BATCH_BUCKETS)?
        .install_recorder()
        .context("installing the metrics recorder")?;
    // `install_recorder` spawns no upkeep task: without one, histogram samples pile up until
    // the next scrape of /metrics, so memory grows without bound when nobody scrapes.
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(METRICS_UPKEEP);
            upkeep.run_upkeep();
            if let Some(rss) = crate::memory::rss_bytes() {
                metrics::gauge!(m::PROCESS_RSS).set(rss as f64);
            }
        })
        .context("starting the metrics upkeep thread")?;
    *h = Some(handle.clone());
    Ok(handle)
}

/// Loads the model of `cfg` and starts its engine (blocking; run off the
/// async runtime).
pub fn load_ready(cfg: &ServeConfig) -> anyhow::Result<Ready> {
    let dir = cfg.model.clone().unwrap_or_else(default_model_dir);
    let blocks = cfg.kv_cache_tokens.div_ceil(cfg.block_size);
    let sched = SchedulerConfig { max_num_seqs: cfg.max_num_seqs, max_batched_tokens: cfg.max_batched_tokens };
    match cfg.device {
        crate::device::Device::Cpu => {
            let mut loaded = load_served(&dir, cfg.random_weights, &cfg.offload()?)?;
            if let Some(plan) = &cfg.placement {
                loaded = crate::offload::apply_placement(loaded, plan)?;
            }
            let eos = loaded.codec.eos_ids().to_vec();
            let core = EngineCore::new(loaded.model, loaded.experts, eos, sched, (blocks, cfg.block_size));
            start(cfg, &dir, core, loaded.codec)
        }
        #[cfg(feature = "cuda")]
        crate::device::Device::Cuda => {
            if cfg.placement.is_some() {
                anyhow::bail!("--placement spreads experts over CPU shards; it does not apply to --device cuda");
            }
            let settings = cfg.offload()?;
            let host = crate::gpu::load_host(&dir, cfg.random_weights, &settings)?;
            let served = host.upload(&dir, &settings, (blocks, cfg.block_size))?;
            let eos = served.codec.eos_ids().to_vec();
            let core = EngineCore::new(served.model, served.backend, eos, sched, (blocks, cfg.block_size));
            start(cfg, &dir, core, served.codec)
        }
        #[cfg(not(feature = "cuda"))]
        crate::device::Device::Cuda => anyhow::bail!(crate::device::NO_CUDA_BUILD),
    }
}

/// Starts the engine thread over `core` and gathers what the front ends need.
fn start<E: moe_model::StepBackend + Send + 'static>(
    cfg: &ServeConfig,
    dir: &std::path::Path,
    core: EngineCore<E>,
    codec: moe_model::TextCodec,
) -> anyhow::Result<Ready> {
    let model_cfg = core.model().config().clone();
    let template = match codec.chat_template() {
        Some(src) => Some(
            ChatTemplate::new(src, codec.bos_token(), codec.eos_token())
                .context("compiling the checkpoint's chat template")?,
        ),
        None => None,
    };
    let name = cfg.served_model_name.clone().unwrap_or_else(|| crate::model_dir::model_name(dir));
    let core =
        core.with_grouping(cfg.grouping()).map_err(|e| anyhow::anyhow!("--micro-batch / --max-deferral: {e}"))?;
    let sink = match &cfg.record_routing {
        Some(path) => Some(crate::trace::start_writer(path, &core.trace_header(&name))?),
        None => None,
    };
    let engine =
        spawn_engine(core, EngineLimits { max_in_flight: cfg.max_num_seqs + cfg.max_waiting, inbox: 1024 }, sink);
    tracing::info!(model = %name, arch = model_cfg.arch.name(), kv_blocks = cfg.kv_cache_tokens.div_ceil(cfg.block_size), device = %cfg.device, "model ready");
    let harmony = crate::frontend::harmony::HarmonyTokens::from_codec(&codec);
    Ok(Ready {
        engine,
        harmony,
        codec: Arc::new(codec),
        template,
        model_name: name,
        created: http_now(),
        engine_vocab: model_cfg.vocab_size,
        model_config: model_cfg,
        tokenize_permits: Arc::new(tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        )),
    })
}

fn http_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Serves HTTP on `http` (and gRPC on `grpc`, if given) until `shutdown`
/// resolves; then refuses new requests (503 / UNAVAILABLE, health
/// NOT_SERVING) and waits up to the grace period for in-flight ones.
pub async fn run_server(
    http: TcpListener,
    grpc: Option<TcpListener>,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grace = Duration::from_secs(state.cfg.shutdown_grace_secs);
    let app = http::router(state.clone())
        .layer(axum::extract::DefaultBodyLimit::max(state.cfg.max_body_bytes))
        // a body slower than its length promises fails its read (408)
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(Duration::from_secs(state.cfg.body_timeout_secs)));
    let limits = http::listener::ConnLimits {
        header_timeout: Duration::from_secs(state.cfg.header_timeout_secs),
        max_connections: state.cfg.max_connections,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (reporter, health) = tonic_health::server::health_reporter();
    let (st, rep) = (state.clone(), reporter.clone());
    tokio::spawn(async move {
        // health turns SERVING once the model is loaded
        while st.ready().is_err() && !st.is_shutting_down() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !st.is_shutting_down() {
            grpc::set_health(&rep, true).await;
        }
        shutdown.await;
        tracing::info!("shutting down: refusing new requests, draining in-flight ones");
        st.begin_shutdown();
        grpc::set_health(&rep, false).await;
        // keep listening while requests drain, so new ones get 503 / UNAVAILABLE
        // (what load balancers and clients expect) rather than a refused connection
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline && st.in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if st.in_flight() > 0 {
            tracing::warn!(in_flight = st.in_flight(), "grace period over: ending the remaining streams");
            st.cut_streams();
            // each stream sends its error event and ends; give them a moment
            let flush = tokio::time::Instant::now() + Duration::from_secs(2);
            while tokio::time::Instant::now() < flush && st.in_flight() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let http_stop = stop_rx.clone();
    let http_server = async move {
        http::listener::serve(http, app, limits, http_stop).await;
        Ok::<(), anyhow::Error>(())
    };
    let grpc_stop = stopped(stop_rx.clone());
    let grpc_server = async {
        match grpc {
            Some(l) => grpc::run_grpc(l, state.clone(), (reporter, health), grpc_stop).await,
            None => Ok(()),
        }
    };
    let servers = async {
        let (h, g) = tokio::join!(http_server, grpc_server);
        h.context("HTTP server failed")?;
        g.context("gRPC server failed")
    };
    let rx = stop_rx;
    tokio::select! {
        r = servers => r?,
        _ = async {
            // the drain above already waited (up to the grace period) for the
            // engine's requests; connections get a moment to flush their last bytes
            stopped(rx).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        } => tracing::warn!("grace period over; exiting with requests in flight"),
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// The whole `serve` command.
pub async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    cfg.validate()?;
    let metrics = install_metrics()?;
    let addr = std::net::SocketAddr::new(cfg.host, cfg.port);
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let gaddr = std::net::SocketAddr::new(cfg.host, cfg.grpc_port);
    let glistener = TcpListener::bind(gaddr).await.with_context(|| format!("binding {gaddr} for gRPC"))?;
    eprintln!("listening on http://{} (REST) and {} (gRPC)", listener.local_addr()?, glistener.local_addr()?);
    let state = AppState::new(cfg, metrics);
    // load in the background so /health can answer 503 meanwhile
    let st = state.clone();
    let (fail_tx, fail_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    tokio::task::spawn_blocking(move || match load_ready(&st.cfg) {
        Ok(ready) => {
            eprintln!("model {} ready", ready.model_name);
            st.set_ready(ready);
        }
        Err(e) => {
            let _ = fail_tx.send(e);
        }
    });
    let server = run_server(listener, Some(glistener), state, shutdown_signal());
    tokio::select! {
        r = server => r,
        Ok(e) = fail_rx => Err(e),
    }
}
