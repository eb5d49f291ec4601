//! The admin listener: `GET /healthz` (metrics and readiness come with their issues).

use std::convert::Infallible;

use http::{Method, StatusCode};
use hyper::body::Incoming;

use crate::body::{self, Response};
use crate::error::problem;

/// Answers one admin request.
pub async fn handle(request: http::Request<Incoming>) -> Result<Response, Infallible> {
    let response = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => {
            let mut response = Response::new(body::full("ok\n"));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain"),
            );
            response
        }
        (_, "/healthz") => problem(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "use GET",
        ),
        (_, path) => problem(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no admin endpoint {path}: try /healthz"),
        ),
    };
    Ok(response)
}
