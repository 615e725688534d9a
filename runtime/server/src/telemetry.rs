//! Logs and traces: log lines (text or JSON) on stderr, filtered by
//! `RUST_LOG`; and, when an OTLP endpoint is configured, every span of
//! Plugboard's own crates (a call, its flow events, plugin calls, host
//! calls, store writes) exported as OpenTelemetry traces over OTLP/HTTP
//! (JSON encoding) by a batch exporter.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response, hyper::HyperClient};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, fmt};

/// The batch exporter sends from a thread of its own, outside the async
/// runtime that hyper needs: each request runs as a task on the server's
/// runtime, and the exporter's thread waits for it.
#[derive(Debug, Clone)]
struct OnRuntime {
    inner: HyperClient,
    rt: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, req: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let inner = self.inner.clone();
        self.rt
            .spawn(async move { inner.send_bytes(req).await })
            .await?
    }
}

/// Sets up logging and, with `otlp` (a URL such as
/// `http://collector:4318/v1/traces`), trace export. Returns the tracer
/// provider to shut down (it sends what is left) before the runtime goes.
pub fn init(
    format: Option<&str>,
    otlp: Option<&str>,
    rt: &tokio::runtime::Handle,
) -> Result<Option<SdkTracerProvider>> {
    let filter = EnvFilter::try_from_default_env()
        // The NATS client's own events are logged by the engine.
        .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn"));
    let logs = match format {
        None | Some("text") => fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        Some("json") => fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        Some(other) => bail!("--log-format must be text or json, got {other:?}"),
    };
    let Some(endpoint) = otlp else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(None);
    };
    // Plain HTTP to a collector beside the node (an OpenTelemetry
    // collector forwards over TLS where it must).
    if !endpoint.starts_with("http://") {
        bail!("--otlp-endpoint must be an http:// URL (a local collector), got {endpoint:?}");
    }
    let exporter = SpanExporter::builder()
        .with_http()
        .with_http_client(OnRuntime {
            inner: HyperClient::with_default_connector(Duration::from_secs(10), None),
            rt: rt.clone(),
        })
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(10))
        .build()
        .context("the OTLP exporter")?;
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_millis(500))
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(Resource::builder().with_service_name("plugboard").build())
        .build();
    // Plugboard's own spans, down to debug (plugin and host calls, store
    // writes); not the HTTP clients' (the exporter's own requests would
    // feed back into it).
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("plugboard"))
        .with_filter(Targets::new().with_target("plugboard", Level::DEBUG));
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .init();
    Ok(Some(provider))
}
