//! The admin listener: `GET /healthz` (the process is alive) and `GET /readyz` (every credential a
//! route uses holds a valid token).

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, StatusCode};
use hyper::body::Incoming;

use crate::body::{self, Response};
use crate::error::problem;
use crate::token::TokenSources;

/// What the admin endpoints report on.
#[derive(Clone, Debug)]
pub struct Admin {
    /// Token sources by credential name.
    pub tokens: TokenSources,
    /// The credentials some route uses: readiness waits for these.
    pub used: Arc<[String]>,
}

impl Admin {
    /// Answers one admin request.
    pub async fn handle(self, request: http::Request<Incoming>) -> Result<Response, Infallible> {
        let get = matches!(*request.method(), Method::GET | Method::HEAD);
        let response = match (get, request.uri().path()) {
            (true, "/healthz") => plain(StatusCode::OK, "ok\n".into()),
            (true, "/readyz") => self.readiness(),
            (false, "/healthz" | "/readyz") => problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "use GET",
            ),
            (_, path) => problem(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no admin endpoint {path}: try /healthz or /readyz"),
            ),
        };
        Ok(response)
    }

    fn readiness(&self) -> Response {
        let missing: Vec<&str> = self
            .used
            .iter()
            .filter(|name| self.tokens.get(name).and_then(|s| s.current()).is_none())
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            plain(StatusCode::OK, "ready\n".into())
        } else {
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "not ready: no valid token yet for credential {}\n",
                    missing.join(", ")
                ),
            )
        }
    }
}

fn plain(status: StatusCode, text: String) -> Response {
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
