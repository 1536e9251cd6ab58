//! The web server of `crier serve`: the public status page, feed and JSON served from memory,
//! the subscribe, confirm and unsubscribe pages, support links, inbound SMS, and the health
//! checks. The status view is rendered once per change (when the status page
//! channel delivers an update) and every reader gets the same bytes with an `ETag`, so a surge
//! of readers costs no store read and no rendering per request.

pub mod api;
pub mod console;
pub mod inbound;
pub mod listener;
pub mod pages;
pub mod prometheus;
pub mod session;
pub mod subscribe;

use crate::status_view::{PageShape, StatusProjection};
use crate::store::Store;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::Utc;
use sha2::{Digest, Sha256};
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// One rendering of the status page, its feed and its JSON, with their ETags.
struct Rendered {
    html: Representation,
    atom: Representation,
    json: Representation,
}

#[derive(Clone)]
struct Representation {
    body: axum::body::Bytes,
    etag: HeaderValue,
    content_type: &'static str,
}

impl Representation {
    fn new(body: Vec<u8>, content_type: &'static str) -> Self {
        let digest = Sha256::digest(&body);
        let tag: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            body: body.into(),
            // A quoted hex digest is always a valid header value.
            etag: HeaderValue::from_str(&format!("\"{tag}\""))
                .unwrap_or_else(|_| HeaderValue::from_static("\"0\"")),
            content_type,
        }
    }

    /// 304 when the reader already has these bytes, else the bytes.
    fn answer(&self, request_headers: &HeaderMap) -> Response {
        let fresh = request_headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|tags| {
                tags.split(',')
                    .any(|tag| tag.trim() == "*" || tag.trim().as_bytes() == self.etag.as_bytes())
            });
        let mut response = if fresh {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            let mut response = Response::new(Body::from(self.body.clone()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(self.content_type),
            );
            response
        };
        let headers = response.headers_mut();
        headers.insert(header::ETAG, self.etag.clone());
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=15"),
        );
        response
    }
}

/// The status page as readers get it, replaced whole when the view changes.
pub struct StatusCache {
    projection: Arc<StatusProjection>,
    /// The status page channel whose updates the page shows; none means no page.
    channel: Option<String>,
    shape: PageShape,
    current: RwLock<Option<Arc<Rendered>>>,
}

impl StatusCache {
    pub fn new(
        projection: Arc<StatusProjection>,
        channel: Option<String>,
        shape: PageShape,
    ) -> Self {
        Self {
            projection,
            channel,
            shape,
            current: RwLock::new(None),
        }
    }

    /// The channel whose deliveries change the page.
    pub fn channel(&self) -> Option<&str> {
        self.channel.as_deref()
    }

    /// Renders the view again from the store, and swaps it in whole.
    pub async fn refresh(&self) -> crate::Result<()> {
        let Some(channel) = &self.channel else {
            return Ok(());
        };
        let view = self
            .projection
            .view(channel, self.shape, Utc::now())
            .await?;
        let files = self.projection.files(&view)?;
        let rendered = Arc::new(Rendered {
            html: Representation::new(files.html.into_bytes(), "text/html; charset=utf-8"),
            atom: Representation::new(files.atom.into_bytes(), "application/atom+xml"),
            json: Representation::new(files.json, "application/json"),
        });
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(rendered);
        Ok(())
    }

    /// An incident's own page, every public update on it, rendered when asked: the long
    /// tail of the status page, read far less than the page itself. None when the incident
    /// is unknown or has no public update.
    async fn history(&self, incident: ulid::Ulid) -> crate::Result<Option<Representation>> {
        let Some(channel) = &self.channel else {
            return Ok(None);
        };
        let incident = match self.projection.store().incident(incident).await {
            Ok(incident) => incident,
            Err(crate::store::StoreError::UnknownIncident(_)) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let Some(view) = self
            .projection
            .history(channel, &incident, Utc::now())
            .await?
        else {
            return Ok(None);
        };
        let html = self.projection.html(&view)?;
        Ok(Some(Representation::new(
            html.into_bytes(),
            "text/html; charset=utf-8",
        )))
    }

    fn current(&self) -> Option<Arc<Rendered>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What the routes share: everything the server knows, each part built once at start.
#[derive(Clone)]
pub struct Shared {
    pub status: Arc<StatusCache>,
    pub store: Arc<dyn Store>,
    pub pages: Arc<pages::Pages>,
    pub inbound: Arc<inbound::Inbound>,
    pub subscriptions: Arc<subscribe::Subscriptions>,
    pub api: api::Api,
    /// The watchdog's promises, for the metrics.
    pub promises: tokio::sync::watch::Receiver<Vec<crate::watchdog::Watched>>,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub console: Arc<console::Console>,
}

/// The routes of `crier serve`.
pub fn router(shared: Shared) -> Router {
    let brand = &shared.pages.brand;
    let public_policy = public_page_policy(&brand.public_url, brand.logo_url.as_deref());
    Router::new()
        .route("/", get(status_page))
        .route("/feed.atom", get(feed))
        .route("/status.json", get(status_json))
        .route("/incidents/{page}", get(incident_history))
        .route(
            "/unsubscribe/{token}",
            get(pages::unsubscribe_page).post(pages::unsubscribe),
        )
        .route(
            "/inbound/sms/{channel}",
            get(inbound::inbound_sms).post(inbound::inbound_sms),
        )
        .route(
            "/inbound/sms/{channel}/status",
            get(inbound::delivery_report).post(inbound::delivery_report),
        )
        .route(
            "/subscribe",
            get(subscribe::subscribe_form).post(subscribe::subscribe),
        )
        .route(
            "/confirm/{token}",
            get(subscribe::confirm_page).post(subscribe::confirm),
        )
        .route(
            "/s/{token}",
            get(subscribe::support_page).post(subscribe::support),
        )
        .route(
            "/metrics",
            get(prometheus::scrape).layer(middleware::from_fn_with_state(
                shared.api.clone(),
                api::authenticate,
            )),
        )
        .route("/robots.txt", get(robots))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .nest("/api", api::router(shared.api.clone()))
        .nest("/admin", console::router(shared.clone()))
        .layer(middleware::map_response(move |response| {
            public_headers(response, public_policy.clone())
        }))
        .layer(middleware::from_fn(log_request))
        .with_state(shared)
}

/// The Content-Security-Policy of the public pages: nothing runs, nothing loads but their own
/// inline style and images, forms post only to this site, and no other site may frame them
/// (a framed "confirm" or "unsubscribe" button could be clicked through a decoy).
fn public_page_policy(public_url: &str, logo_url: Option<&str>) -> HeaderValue {
    let origin = |url: &str| {
        reqwest::Url::parse(url)
            .map(|url| url.origin().ascii_serialization())
            .unwrap_or_default()
    };
    let logo = logo_url.map(origin).unwrap_or_default();
    let policy = format!(
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data: https: {logo}; \
         connect-src 'self'; form-action 'self' {}; frame-ancestors 'none'; base-uri 'none'",
        origin(public_url)
    );
    HeaderValue::from_str(policy.trim())
        .unwrap_or_else(|_| HeaderValue::from_static("frame-ancestors 'none'"))
}

/// Every answer not framed, its type not guessed; pages that set a stricter policy (the
/// console) keep theirs.
async fn public_headers(mut response: Response, policy: HeaderValue) -> Response {
    let headers = response.headers_mut();
    headers
        .entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(policy);
    headers
        .entry(header::X_FRAME_OPTIONS)
        .or_insert(HeaderValue::from_static("DENY"));
    headers
        .entry(header::X_CONTENT_TYPE_OPTIONS)
        .or_insert(HeaderValue::from_static("nosniff"));
    headers
        .entry(header::REFERRER_POLICY)
        .or_insert(HeaderValue::from_static("strict-origin-when-cross-origin"));
    response
}

/// Search engines may index the status page and the subscribe form; the personal links
/// (confirm, unsubscribe, support), the console and the API are nobody's search result.
async fn robots() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        "User-agent: *\nDisallow: /admin\nDisallow: /api\nDisallow: /confirm/\nDisallow: \
         /unsubscribe/\nDisallow: /s/\nDisallow: /inbound/\nDisallow: /metrics\n",
    )
        .into_response()
}

async fn status_page(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    serve_rendered(&shared, &headers, |r| &r.html)
}

async fn feed(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    serve_rendered(&shared, &headers, |r| &r.atom)
}

async fn status_json(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    serve_rendered(&shared, &headers, |r| &r.json)
}

/// `GET /incidents/{id}.html`: an incident's own page, linked from the status page.
async fn incident_history(
    State(shared): State<Shared>,
    axum::extract::Path(page): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let not_found = || (StatusCode::NOT_FOUND, "no such incident\n").into_response();
    let Some(id) = page
        .strip_suffix(".html")
        .and_then(|id| ulid::Ulid::from_string(id).ok())
    else {
        return not_found();
    };
    match shared.status.history(id).await {
        Ok(Some(page)) => page.answer(&headers),
        Ok(None) => not_found(),
        Err(error) => {
            tracing::warn!(%error, "the incident's page could not be rendered");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the page cannot be shown just now\n",
            )
                .into_response()
        }
    }
}

fn serve_rendered(
    shared: &Shared,
    headers: &HeaderMap,
    pick: impl Fn(&Rendered) -> &Representation,
) -> Response {
    match shared.status.current() {
        Some(rendered) => pick(&rendered).answer(headers),
        None => (
            StatusCode::NOT_FOUND,
            "no status page channel is configured\n",
        )
            .into_response(),
    }
}

/// Liveness: the process answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: the store answers.
async fn readyz(State(shared): State<Shared>) -> Response {
    match shared.store.subscriber_count().await {
        Ok(_) => "ready\n".into_response(),
        Err(error) => {
            tracing::warn!(%error, "not ready: the store does not answer");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the store does not answer\n",
            )
                .into_response()
        }
    }
}

/// A cookie no script can read and no other site's request carries: `HttpOnly`,
/// `SameSite=Strict`, `Path=/`, and `Secure` on an https site. Its value is a signed token
/// (base64url and a dot) or empty, so the header is always valid.
fn strict_cookie(name: &str, value: &str, max_age_seconds: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; Max-Age={max_age_seconds}; HttpOnly; SameSite=Strict{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Whether two secrets are equal, in time that depends only on their lengths (`subtle`).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// One log line per request, and one count by route and status. Paths that carry a token
/// show only where it was; the count's route is the pattern (`/confirm/{token}`), never the
/// path, so no token or contact reaches the metrics either.
async fn log_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = loggable_path(request.uri().path());
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |matched| matched.as_str())
        .to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    tracing::info!(
        %method,
        path,
        status,
        elapsed_us = started.elapsed().as_micros() as u64,
        "request"
    );
    metrics::counter!(
        "crier_http_requests_total",
        "method" => method.to_string(),
        "route" => route,
        "status" => status.to_string()
    )
    .increment(1);
    response
}

/// `/unsubscribe/<token>` logs as `/unsubscribe/…`: a token in a log is a key to an account.
fn loggable_path(path: &str) -> String {
    const CARRY_TOKENS: [&str; 3] = ["/unsubscribe/", "/confirm/", "/s/"];
    for prefix in CARRY_TOKENS {
        if path.starts_with(prefix) {
            return format!("{prefix}…");
        }
    }
    // A contact in a path is a customer's address: the log keeps only where it was.
    if let Some(rest) = path.strip_prefix("/api/subscribers/")
        && rest != "import"
    {
        return "/api/subscribers/…".to_owned();
    }
    path.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_in_a_path_never_reaches_the_log() {
        assert_eq!(loggable_path("/unsubscribe/abc.def"), "/unsubscribe/…");
        assert_eq!(loggable_path("/s/abc"), "/s/…");
        assert_eq!(loggable_path("/feed.atom"), "/feed.atom");
        assert_eq!(
            loggable_path("/api/subscribers/ann@example.com"),
            "/api/subscribers/…"
        );
        assert_eq!(
            loggable_path("/api/subscribers/import"),
            "/api/subscribers/import"
        );
    }

    #[test]
    fn a_reader_with_the_current_etag_gets_304_and_others_the_bytes() {
        let page = Representation::new(b"<html>".to_vec(), "text/html");
        let mut headers = HeaderMap::new();
        assert_eq!(page.answer(&headers).status(), StatusCode::OK);
        headers.insert(header::IF_NONE_MATCH, page.etag.clone());
        assert_eq!(page.answer(&headers).status(), StatusCode::NOT_MODIFIED);
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert_eq!(page.answer(&headers).status(), StatusCode::OK);
    }
}
