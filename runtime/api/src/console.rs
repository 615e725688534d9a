//! The web console's files (`web/console`, built by `scripts/build-web.sh`
//! into `target/web/console`), served at `/console/`. The page signs in
//! with an agent's, a supervisor's or the tenant's token and talks to the
//! API v1 and its event stream like any client: it has no powers of its
//! own.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use std::path::PathBuf;
use std::sync::Arc;

/// The files the console is made of, with their content types: nothing
/// else in the directory is served.
const FILES: &[(&str, &str)] = &[
    ("index.html", "text/html; charset=utf-8"),
    ("console.js", "text/javascript; charset=utf-8"),
    ("console.js.map", "application/json"),
    ("console.css", "text/css; charset=utf-8"),
];

/// The page may load only its own files and talk only to its own origin
/// (the API and the event stream), and no other site may frame it.
const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
                   style-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The console's routes; `dir` is the built console (`None`: 404 with a
/// hint).
pub fn router(dir: Option<PathBuf>) -> Router {
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::permanent("/console/") }),
        )
        .route("/console/", get(index))
        .route("/console/{file}", get(file))
        .with_state(Arc::new(dir))
}

async fn index(State(dir): State<Arc<Option<PathBuf>>>) -> Response {
    serve(&dir, "index.html").await
}

async fn file(State(dir): State<Arc<Option<PathBuf>>>, Path(name): Path<String>) -> Response {
    serve(&dir, &name).await
}

async fn serve(dir: &Option<PathBuf>, name: &str) -> Response {
    let Some((name, mime)) = FILES.iter().find(|(n, _)| *n == name) else {
        return (StatusCode::NOT_FOUND, "no such console file").into_response();
    };
    let Some(dir) = dir else {
        return (
            StatusCode::NOT_FOUND,
            "the console is not built (scripts/build-web.sh)",
        )
            .into_response();
    };
    match tokio::fs::read(dir.join(name)).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, *mime),
                (header::CACHE_CONTROL, "no-cache"),
                (header::CONTENT_SECURITY_POLICY, CSP),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                (header::REFERRER_POLICY, "no-referrer"),
            ],
            bytes,
        )
            .into_response(),
        Err(e) => {
            tracing::warn!("reading console file {name}: {e}");
            (StatusCode::NOT_FOUND, "the console is not built").into_response()
        }
    }
}
