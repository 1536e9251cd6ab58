//! The admin API under `/api`: the one way in to the store while `crier serve` runs, for the
//! CLI and for other systems. Bearer tokens named in the config (the name is recorded as the
//! author), JSON in and out, errors as `{error, detail}`, `Idempotency-Key` on sends, and an
//! OpenAPI document generated from the handlers themselves (`utoipa-axum` registers a route
//! and its documentation in one step, so neither can miss the other).

mod routes;

pub(crate) use routes::{AcceptAnswer, accept_update};
pub use routes::{
    Accepted, IncidentSummary, LinkRequest, Retried, RetryRequest, SubscribeRequest,
    SubscriberSummary, SupportLink,
};

use crate::app::App;
use crate::error::ErrorKind;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use secrecy::ExposeSecret;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use ulid::Ulid;
use utoipa::OpenApi;

/// The largest JSON body the API reads.
const JSON_BODY_LIMIT: usize = 1 << 20;
/// The largest subscriber file `POST /api/subscribers` imports in one request.
pub(crate) const IMPORT_BODY_LIMIT: usize = 64 << 20;

/// What the API's handlers share.
#[derive(Clone)]
pub struct Api {
    app: Arc<App>,
    /// Digests of the admin tokens, by name: compared in constant time.
    tokens: Arc<Vec<(String, [u8; 32])>>,
    /// Accepted updates go here to be planned by the server's planner.
    plans: mpsc::UnboundedSender<Ulid>,
}

impl Api {
    /// Refuses to build when a configured token's variable is unset: a server whose admin
    /// API silently refuses its own lead would be found out on the bad day.
    pub fn new(app: Arc<App>, plans: mpsc::UnboundedSender<Ulid>) -> crate::Result<Self> {
        let mut tokens = Vec::new();
        for token in &app.config.api_tokens {
            let secret = token.secret.as_ref().ok_or_else(|| {
                crate::Error::user(format!(
                    "{}: api.tokens.{}: the environment variable {} is not set",
                    app.config.file.display(),
                    token.name,
                    token.variable
                ))
            })?;
            tokens.push((
                token.name.clone(),
                digest(secret.expose_secret().as_bytes()),
            ));
        }
        if tokens.is_empty() {
            tracing::warn!(
                "no admin token is configured ([api] tokens): the admin API refuses every request"
            );
        }
        Ok(Self {
            app,
            tokens: Arc::new(tokens),
            plans,
        })
    }

    /// The token's name, when `presented` is one of the tokens. Every token is compared, in
    /// constant time, so the answer's timing tells nothing about how close a guess was.
    fn token_name(&self, presented: &[u8]) -> Option<String> {
        let presented = digest(presented);
        let mut found = None;
        for (name, token) in self.tokens.iter() {
            if bool::from(token.ct_eq(&presented)) {
                found = Some(name.clone());
            }
        }
        found
    }
}

impl Api {
    pub(crate) fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// The name of the token presented at the console's sign-in, and its fingerprint.
    pub(crate) fn sign_in(&self, presented: &str) -> Option<(String, String)> {
        let name = self.token_name(presented.trim().as_bytes())?;
        let fingerprint = self.fingerprint(&name)?;
        Some((name, fingerprint))
    }

    /// Whether the token named `name` still has the secret it had when `fingerprint` was
    /// taken: a rotated or removed token ends the sessions it opened.
    pub(crate) fn still_holds(&self, name: &str, fingerprint: &str) -> bool {
        self.fingerprint(name)
            .is_some_and(|current| super::same_secret(current.as_bytes(), fingerprint.as_bytes()))
    }

    /// A digest of the token's digest: names its secret without revealing it.
    fn fingerprint(&self, name: &str) -> Option<String> {
        let (_, token) = self.tokens.iter().find(|(known, _)| known == name)?;
        let digest = Sha256::digest([b"session".as_slice(), token.as_slice()].concat());
        Some(digest[..12].iter().map(|b| format!("{b:02x}")).collect())
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "crier admin API",
        description = "Send updates, follow their deliveries, manage subscribers and look up \
                       orders while `crier serve` runs. Every route needs \
                       `Authorization: Bearer <token>`; errors are `{error, detail}`."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The routes under `/api`, and the OpenAPI document that describes them.
pub fn router<S: Clone + Send + Sync + 'static>(api: Api) -> axum::Router<S> {
    let (routes, mut document) = routes::all()
        .layer(middleware::from_fn_with_state(api.clone(), authenticate))
        .split_for_parts();
    // The document lists paths as mounted, under /api.
    document.paths.paths = std::mem::take(&mut document.paths.paths)
        .into_iter()
        .map(|(path, item)| (format!("/api{path}"), item))
        .collect();
    let document = Arc::new(document);
    routes
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let document = document.clone();
                async move { Json(document.as_ref().clone()) }
            }),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(api)
}

/// The name of the token a request came with: the author of what it sends.
#[derive(Debug, Clone)]
pub struct Author(pub String);

pub(crate) async fn authenticate(
    State(api): State<Api>,
    mut request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let Some(name) = presented.and_then(|token| api.token_name(token.as_bytes())) else {
        let mut response = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer <token> with one of the tokens [api] tokens names",
        )
        .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return response;
    };
    request.extensions_mut().insert(Author(name));
    next.run(request).await
}

/// An error answer: `{error, detail}` with its status.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApiError {
    #[serde(skip)]
    status: StatusCode,
    /// A stable code: invalid, malformed, unauthorized, not_found, conflict, payload_too_large,
    /// unsupported_media_type, idempotency_key_reused, unavailable, internal.
    error: &'static str,
    /// What went wrong, in words.
    detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            error,
            detail: detail.into(),
        }
    }

    /// The stable code: `invalid`, `idempotency_key_reused`…
    pub(crate) fn code(&self) -> &'static str {
        self.error
    }

    /// What went wrong, in words.
    pub(crate) fn detail(&self) -> &str {
        &self.detail
    }

    fn invalid(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(&self)).into_response()
    }
}

impl From<crate::Error> for ApiError {
    fn from(error: crate::Error) -> Self {
        let kind = error.kind();
        let status =
            StatusCode::from_u16(kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        match kind {
            ErrorKind::User => Self::new(status, "invalid", error.to_string()),
            ErrorKind::NotFound => Self::new(status, "not_found", error.to_string()),
            ErrorKind::Conflict => Self::new(status, "conflict", error.to_string()),
            ErrorKind::Unavailable => {
                tracing::error!(%error, "the admin API cannot reach the store");
                Self::new(status, "unavailable", error.to_string())
            }
            ErrorKind::Internal => {
                // The reason may name internals; the server's log has it.
                tracing::error!(%error, "the admin API failed");
                Self::new(
                    status,
                    "internal",
                    "crier failed to answer; the server's log says why",
                )
            }
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> Self {
        crate::Error::from(error).into()
    }
}

impl From<crate::domain::DomainError> for ApiError {
    fn from(error: crate::domain::DomainError) -> Self {
        crate::Error::from(error).into()
    }
}

/// A JSON body, with its bytes (an idempotency key's fingerprint is taken over them). Its
/// rejections are API errors: 415 without a JSON content type, 413 over the limit, 400 for
/// JSON that does not parse, 422 for JSON of the wrong shape (an unknown field among them),
/// naming the field.
pub struct ApiJson<T> {
    pub value: T,
    pub bytes: Bytes,
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(request.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON, with Content-Type: application/json",
            ));
        }
        let bytes = read_body(request, state).await?;
        let value = parse_json(&bytes)?;
        Ok(Self { value, bytes })
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    content_type(headers).is_some_and(|media| media == "application/json")
}

/// The media type, lower-cased, without its parameters.
fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| {
            value
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
}

/// Reads the body, up to the route's `DefaultBodyLimit`.
async fn read_body<S: Send + Sync>(request: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the body is over this route's size limit",
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "malformed",
                    format!("cannot read the body: {}", rejection.body_text()),
                )
            }
        })
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        let place = if path == "." || path.is_empty() {
            String::new()
        } else {
            format!("{path}: ")
        };
        match inner.classify() {
            serde_json::error::Category::Data => ApiError::invalid(format!("{place}{inner}")),
            _ => ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed",
                format!("the body is not JSON: {inner}"),
            ),
        }
    })?;
    deserializer.end().map_err(|inner| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            format!("the body is not JSON: {inner}"),
        )
    })?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_of_the_wrong_shape_is_422_naming_the_field_and_broken_json_is_400() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Body {
            order: String,
        }
        let unknown = parse_json::<Body>(br#"{"order": "AB-1234", "colour": "red"}"#).unwrap_err();
        assert_eq!(unknown.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(unknown.detail.contains("colour"), "{}", unknown.detail);
        let wrong_type = parse_json::<Body>(br#"{"order": 7}"#).unwrap_err();
        assert_eq!(wrong_type.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            wrong_type.detail.starts_with("order: "),
            "{}",
            wrong_type.detail
        );
        let broken = parse_json::<Body>(br#"{"order": "#).unwrap_err();
        assert_eq!(broken.status, StatusCode::BAD_REQUEST);
        let trailing = parse_json::<Body>(br#"{"order": "AB-1234"} x"#).unwrap_err();
        assert_eq!(trailing.status, StatusCode::BAD_REQUEST);
    }
}
