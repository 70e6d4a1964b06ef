//! The admin listener: `/healthz`, `/metrics`, the entries API (bearer token) and the status
//! page. Separate from the proxy-facing listener so it can stay on loopback.

use std::path::Path;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;

use crate::gate::Gate;
use crate::policy::Policy;

/// Shared state of the admin routes.
#[derive(Clone)]
pub struct Admin {
    gate: Gate,
    /// The API's bearer token; `None` turns the API off.
    token: Option<String>,
}

/// Why the admin token could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// `admin.token_file` cannot be read.
    #[error("cannot read admin.token_file {}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is empty.
    #[error("admin.token_file {} is empty", path.display())]
    Empty {
        /// The file.
        path: std::path::PathBuf,
    },
}

/// The admin token: `admin.token` (`GATEKEEPER_ADMIN__TOKEN`) wins over `admin.token_file`;
/// neither means the API is off.
pub fn load_token(policy: &Policy) -> Result<Option<String>, TokenError> {
    if let Some(t) = &policy.admin.token {
        return Ok(Some(t.clone()));
    }
    let Some(path) = &policy.admin.token_file else {
        return Ok(None);
    };
    read_token(path).map(Some)
}

fn read_token(path: &Path) -> Result<String, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(token)
}

/// The admin router.
pub fn router(gate: Gate, token: Option<String>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .with_state(Admin { gate, token })
}

/// 200 `ok`, or 503 with the reason when the last output write failed.
async fn healthz(State(admin): State<Admin>) -> Response {
    match admin.gate.output_error() {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("outputs failing: {e}\n"),
        )
            .into_response(),
    }
}
