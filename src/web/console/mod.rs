//! The comms lead's console under `/admin`: sign in with an admin token, compose an update with
//! a live preview per channel, send it and watch its deliveries, retry dead letters, and follow
//! and resolve incidents, with the watchdog's banner on every page.
//!
//! Pages are rendered on the server from templates built into the binary (the console is
//! crier's own tool, not a branded page), and work without JavaScript; a little plain script
//! refreshes the preview while the lead types and the counts while an update goes out, by
//! asking the server for the same fragments it renders into the pages. Every change is a POST
//! that carries the session's CSRF token and comes from the console's own origin.

mod form;

use super::Shared;
use super::api::{AcceptAnswer, Accepted, Api, accept_update};
use super::session::{Session, Sessions};
use crate::app::EachPreviewed;
use crate::channel::{PartFormat, RenderedPart};
use crate::delivery::{Counts, DeliveryState};
use crate::domain::IncidentState;
use crate::render::{and_list, human_time, thousands};
use crate::watchdog::Stage;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use form::ComposeForm;
use handlebars::Handlebars;
use serde::Serialize;
use std::collections::HashMap;
use ulid::Ulid;

/// The largest compose form read, a file of order numbers included.
const COMPOSE_BODY_LIMIT: usize = 8 << 20;
/// Incidents the list and the compose page's follow-up choice show.
const INCIDENTS_SHOWN: usize = 30;

const TEMPLATES: [(&str, &str); 9] = [
    ("layout", include_str!("pages/layout.hbs")),
    ("login", include_str!("pages/login.hbs")),
    ("compose", include_str!("pages/compose.hbs")),
    ("previews", include_str!("pages/previews.hbs")),
    ("progress", include_str!("pages/progress.hbs")),
    ("progress_table", include_str!("pages/progress_table.hbs")),
    ("failures", include_str!("pages/failures.hbs")),
    ("incidents", include_str!("pages/incidents.hbs")),
    ("message", include_str!("pages/message.hbs")),
];
const SCRIPT: &str = include_str!("console.js");
const STYLE: &str = include_str!("console.css");

/// What the console's handlers share besides the server's [`Shared`].
pub struct Console {
    sessions: Sessions,
    pages: Handlebars<'static>,
    api: Api,
}

impl Console {
    pub fn new(api: Api) -> crate::Result<Self> {
        let mut pages = Handlebars::new();
        pages.set_strict_mode(false);
        for (name, source) in TEMPLATES {
            pages
                .register_template_string(name, source)
                .map_err(|e| crate::Error::internal(anyhow::anyhow!("console page {name}: {e}")))?;
        }
        let links = api.app().composer.link_maker();
        Ok(Self {
            sessions: Sessions::new(links.signer().clone(), links.public_url()),
            pages,
            api,
        })
    }

    fn render(&self, status: StatusCode, name: &str, view: &impl Serialize) -> Response {
        match self.pages.render(name, view) {
            Ok(page) => (status, Html(page)).into_response(),
            Err(error) => {
                tracing::error!(%error, page = name, "cannot render a console page");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the page cannot be shown\n",
                )
                    .into_response()
            }
        }
    }

    fn channel_ids(&self) -> Vec<String> {
        self.api
            .app()
            .channels
            .iter()
            .map(|c| c.id.clone())
            .collect()
    }
}

/// The console's routes, mounted at `/admin`.
pub fn router(shared: Shared) -> Router<Shared> {
    let signed_in = Router::new()
        .route("/", get(compose_page))
        .route(
            "/compose",
            post(compose).layer(DefaultBodyLimit::max(COMPOSE_BODY_LIMIT)),
        )
        .route("/updates/{id}", get(progress_page))
        .route("/updates/{id}/progress", get(progress_fragment))
        .route("/updates/{id}/failures", get(failures_page))
        .route("/updates/{id}/retry", post(retry_dead))
        .route("/incidents", get(incidents_page))
        .route("/logout", post(logout))
        .layer(middleware::from_fn_with_state(shared, require_session));
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/console.js", get(script))
        .route("/console.css", get(style))
        .merge(signed_in)
        .layer(middleware::map_response(console_headers))
}

/// Every console answer: never cached, never framed, scripts and forms only from here.
async fn console_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            // Inline styles and any https image: a preview frame (srcdoc, sandboxed, so
            // nothing in it runs) shows an email or the status page with their own styles.
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: https:; \
             frame-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// Lets a request through only with a live session whose token still holds; a change must
/// also come from the console's own origin (its CSRF token is checked by the handler, which
/// reads the form).
async fn require_session(
    State(shared): State<Shared>,
    mut request: Request,
    next: Next,
) -> Response {
    let console = &shared.console;
    let session = console
        .sessions
        .current(request.headers(), Utc::now())
        .filter(|session| console.api.still_holds(&session.name, &session.fingerprint));
    let Some(session) = session else {
        // The script's requests get a status it can act on, not the sign-in page to paste in.
        if request.headers().contains_key("x-crier-fragment") {
            return (StatusCode::UNAUTHORIZED, "signed out\n").into_response();
        }
        if request.method() == Method::GET {
            return Redirect::to("/admin/login").into_response();
        }
        return message(
            &shared,
            None,
            StatusCode::UNAUTHORIZED,
            "Signed out",
            "Your session has ended. Sign in again.",
            ("/admin/login", "Sign in"),
        );
    };
    if request.method() != Method::GET && !console.sessions.same_origin(request.headers()) {
        tracing::warn!(who = %session.name, path = %request.uri().path(), "console: a cross-site request was refused");
        return message(
            &shared,
            Some(&session),
            StatusCode::FORBIDDEN,
            "Refused",
            "This request came from another site, so it was refused.",
            ("/admin", "Back to the console"),
        );
    }
    request.extensions_mut().insert(session);
    next.run(request).await
}

// ---- the frame every page shares -------------------------------------------------------------

#[derive(Serialize)]
struct Frame {
    title: String,
    /// The signed-in token's name.
    signed_in: Option<String>,
    csrf: Option<String>,
    nav: &'static str,
    alerts: Vec<AlertView>,
    refresh: bool,
}

#[derive(Serialize)]
struct AlertView {
    stage: &'static str,
    label: &'static str,
    text: String,
    incident: String,
}

impl Frame {
    fn new(shared: &Shared, session: Option<&Session>, title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            signed_in: session.map(|s| s.name.clone()),
            csrf: session.map(|s| shared.console.sessions.csrf(s)),
            nav: "",
            alerts: session.map(|_| alerts(shared)).unwrap_or_default(),
            refresh: false,
        }
    }
}

/// The watchdog's banner: every promise due soon or overdue.
fn alerts(shared: &Shared) -> Vec<AlertView> {
    let now = Utc::now();
    shared
        .promises
        .borrow()
        .iter()
        .filter_map(|watched| {
            let promise = &watched.promise;
            let due = human_time(promise.due);
            let minutes = (promise.due - now).num_minutes().abs();
            let (stage, label, text) = match watched.stage? {
                Stage::DueSoon => (
                    "due_soon",
                    "Update due soon",
                    format!(
                        "the next update on “{}” is promised by {due}, in {minutes} min.",
                        promise.title
                    ),
                ),
                Stage::Overdue => (
                    "overdue",
                    "Update overdue",
                    format!(
                        "the next update on “{}” was promised by {due}, {minutes} min ago.",
                        promise.title
                    ),
                ),
            };
            Some(AlertView {
                stage,
                label,
                text,
                incident: promise.incident.to_string(),
            })
        })
        .collect()
}

#[derive(Serialize)]
struct MessageView {
    #[serde(flatten)]
    frame: Frame,
    heading: String,
    message: String,
    is_error: bool,
    back: String,
    back_text: String,
}

fn message(
    shared: &Shared,
    session: Option<&Session>,
    status: StatusCode,
    heading: &str,
    text: &str,
    (back, back_text): (&str, &str),
) -> Response {
    let view = MessageView {
        frame: Frame::new(shared, session, heading),
        heading: heading.to_owned(),
        message: text.to_owned(),
        is_error: status.is_client_error() || status.is_server_error(),
        back: back.to_owned(),
        back_text: back_text.to_owned(),
    };
    shared.console.render(status, "message", &view)
}

async fn script() -> Response {
    static_file(SCRIPT, "text/javascript; charset=utf-8")
}

async fn style() -> Response {
    static_file(STYLE, "text/css; charset=utf-8")
}

fn static_file(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Built into the binary: it changes only when crier is upgraded, so a few minutes.
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

// ---- signing in and out ----------------------------------------------------------------------

#[derive(Serialize)]
struct LoginView {
    #[serde(flatten)]
    frame: Frame,
    login_csrf: String,
    error: Option<String>,
}

/// The sign-in form with a fresh double-submit CSRF token (there is no session yet to bind
/// one to), and its cookie.
fn login_form(shared: &Shared, status: StatusCode, error: Option<&str>) -> Response {
    let (login_csrf, cookie) = shared.subscriptions.csrf();
    let view = LoginView {
        frame: Frame::new(shared, None, "Sign in"),
        login_csrf,
        error: error.map(str::to_owned),
    };
    let mut response = shared.console.render(status, "login", &view);
    response.headers_mut().append(header::SET_COOKIE, cookie);
    response
}

async fn login_page(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    let signed_in = shared
        .console
        .sessions
        .current(&headers, Utc::now())
        .is_some_and(|s| shared.console.api.still_holds(&s.name, &s.fingerprint));
    if signed_in {
        return Redirect::to("/admin").into_response();
    }
    login_form(&shared, StatusCode::OK, None)
}

struct LoginForm {
    csrf: String,
    token: String,
}

async fn login(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let console = &shared.console;
    if !console.sessions.same_origin(&headers) {
        tracing::warn!("console: a cross-site sign-in was refused");
        return login_form(
            &shared,
            StatusCode::FORBIDDEN,
            Some("This sign-in came from another site, so it was refused."),
        );
    }
    let form: LoginForm = login_fields(&body);
    if !shared.subscriptions.csrf_holds(&headers, &form.csrf) {
        return login_form(
            &shared,
            StatusCode::FORBIDDEN,
            Some("The sign-in form expired or came without its token: sign in again."),
        );
    }
    let Some((name, fingerprint)) = console.api.sign_in(&form.token) else {
        tracing::warn!("console: a sign-in with a wrong token was refused");
        return login_form(
            &shared,
            StatusCode::UNAUTHORIZED,
            Some("That is not one of the admin tokens."),
        );
    };
    let (_, cookie) = console.sessions.open(&name, &fingerprint, Utc::now());
    tracing::info!(who = %name, "console: signed in");
    let mut response = Redirect::to("/admin").into_response();
    response.headers_mut().append(header::SET_COOKIE, cookie);
    response
}

/// The sign-in form's fields; any other is ignored.
fn login_fields(body: &[u8]) -> LoginForm {
    let mut form = LoginForm {
        csrf: String::new(),
        token: String::new(),
    };
    for (name, value) in form_urlencoded::parse(body) {
        match name.as_ref() {
            "csrf" => form.csrf = value.into_owned(),
            "token" => form.token = value.into_owned(),
            _ => {}
        }
    }
    form
}

/// A POST's `csrf` field, when it is this session's.
fn csrf_in(shared: &Shared, session: &Session, body: &[u8]) -> bool {
    let field = form_urlencoded::parse(body)
        .find(|(name, _)| name == "csrf")
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default();
    shared
        .console
        .sessions
        .csrf_holds(session, &field, Utc::now())
}

fn forged(shared: &Shared, session: &Session) -> Response {
    tracing::warn!(who = %session.name, "console: a form without this session's CSRF token was refused");
    message(
        shared,
        Some(session),
        StatusCode::FORBIDDEN,
        "Refused",
        "The form came without this session's token, so nothing was changed. Reload the page and try again.",
        ("/admin", "Back to the console"),
    )
}

async fn logout(
    State(shared): State<Shared>,
    axum::Extension(session): axum::Extension<Session>,
    body: Bytes,
) -> Response {
    if !csrf_in(&shared, &session, &body) {
        return forged(&shared, &session);
    }
    shared.console.sessions.close(&session, Utc::now());
    tracing::info!(who = %session.name, "console: signed out");
    let mut response = Redirect::to("/admin/login").into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        shared.console.sessions.clearing_cookie(),
    );
    response
}

// ---- compose ---------------------------------------------------------------------------------

#[derive(Serialize)]
struct ComposeView {
    #[serde(flatten)]
    frame: Frame,
    key: String,
    incidents: Vec<IncidentOption>,
    headline: String,
    body: String,
    states: Vec<StateOption>,
    next_update: String,
    audience: String,
    orders: String,
    channels: Vec<ChannelOption>,
    error: Option<String>,
    /// The site's time zone, which a promised time of day is in.
    time_zone: &'static str,
    /// The orders of a file chosen earlier, kept in the page: a browser does not send the
    /// file again.
    orders_file: String,
    orders_file_name: String,
    orders_file_lines: usize,
    /// Before anything is sent: who it reaches, and the button that sends it.
    confirm: Option<ConfirmStep>,
    /// A suggestion in an empty update field, never sent unless typed.
    body_placeholder: &'static str,
    #[serde(flatten)]
    previews: PreviewsView,
}

/// The confirm step: who the update reaches, counted the way planning will count it.
#[derive(Serialize)]
struct ConfirmStep {
    reach: String,
    /// The form's audience as confirmed: a changed audience asks again.
    digest: String,
}

#[derive(Serialize)]
struct IncidentOption {
    id: String,
    title: String,
    state: &'static str,
    selected: bool,
}

#[derive(Serialize)]
struct StateOption {
    value: &'static str,
    label: &'static str,
    selected: bool,
}

#[derive(Serialize)]
struct ChannelOption {
    id: String,
    kind: &'static str,
    checked: bool,
}

#[derive(Serialize, Default)]
struct PreviewsView {
    previews: Vec<PreviewView>,
    preview_error: Option<String>,
}

#[derive(Serialize)]
struct PreviewView {
    channel: String,
    kind: &'static str,
    refused: Option<String>,
    measures: Vec<PartView>,
    parts: Vec<PartView>,
}

#[derive(Serialize)]
struct PartView {
    part: String,
    /// As the recipient gets it; JSON laid out with one field a line.
    text: String,
    /// An HTML document: shown rendered, in a frame that runs nothing, with its source below.
    html: bool,
}

/// `text` laid out one field a line, its fields in the order they are sent; None unless it is
/// JSON.
fn pretty_json(text: &str) -> Option<String> {
    let mut from = serde_json::Deserializer::from_str(text);
    let mut out = Vec::new();
    let mut to = serde_json::Serializer::pretty(&mut out);
    serde_transcode::transcode(&mut from, &mut to).ok()?;
    from.end().ok()?;
    String::from_utf8(out).ok()
}

impl PartView {
    fn of(part: RenderedPart) -> Self {
        let text = match part.format {
            PartFormat::Json => pretty_json(&part.text).unwrap_or(part.text),
            _ => part.text,
        };
        Self {
            html: part.format == PartFormat::Html,
            part: part.part,
            text,
        }
    }
}

impl PreviewsView {
    fn of(previewed: EachPreviewed) -> Self {
        let previews = previewed
            .channels
            .into_iter()
            .map(|rendering| {
                let (parts, refused) = match rendering.rendered {
                    Ok(parts) => (parts, None),
                    Err(reason) => (Vec::new(), Some(reason)),
                };
                let (measures, parts): (Vec<_>, Vec<_>) = parts
                    .into_iter()
                    .partition(|part| part.format == PartFormat::Measure);
                let measures = measures.into_iter().map(PartView::of).collect();
                let parts = parts.into_iter().map(PartView::of).collect();
                PreviewView {
                    channel: rendering.channel,
                    kind: rendering.kind,
                    refused,
                    measures,
                    parts,
                }
            })
            .collect();
        Self {
            previews,
            preview_error: None,
        }
    }

    fn failed(reason: String) -> Self {
        Self {
            previews: Vec::new(),
            preview_error: Some(reason),
        }
    }
}

struct ComposeQuery {
    incident: Option<String>,
    state: Option<String>,
}

/// A fresh idempotency key for one compose form.
fn form_key() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 18]>())
}

async fn compose_page(
    State(shared): State<Shared>,
    axum::Extension(session): axum::Extension<Session>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let query = ComposeQuery {
        incident: query.get("incident").cloned(),
        state: query.get("state").cloned(),
    };
    let form = ComposeForm {
        key: form_key(),
        incident: query.incident.unwrap_or_default(),
        state: query.state.unwrap_or_default(),
        body: String::new(),
        audience: "everyone".into(),
        channels: shared.console.channel_ids(),
        ..ComposeForm::default()
    };
    let view = compose_view(&shared, &session, &form, None, PreviewsView::default()).await;
    shared.console.render(StatusCode::OK, "compose", &view)
}

async fn compose_view(
    shared: &Shared,
    session: &Session,
    form: &ComposeForm,
    error: Option<String>,
    previews: PreviewsView,
) -> ComposeView {
    let app = shared.console.api.app();
    let incidents = match shared.store.incidents().await {
        Ok(incidents) => incidents,
        Err(error) => {
            tracing::warn!(%error, "console: the incidents could not be read");
            Vec::new()
        }
    };
    let incidents = incidents
        .into_iter()
        .filter(|incident| {
            incident.state != IncidentState::Resolved || incident.id.to_string() == form.incident
        })
        .take(INCIDENTS_SHOWN)
        .map(|incident| IncidentOption {
            selected: incident.id.to_string() == form.incident,
            id: incident.id.to_string(),
            title: incident.title,
            state: incident.state.label(),
        })
        .collect();
    let states = std::iter::once(StateOption {
        value: "",
        label: "Unchanged (or investigating, for a new incident)",
        selected: form.state.is_empty(),
    })
    .chain(
        [
            IncidentState::Investigating,
            IncidentState::Identified,
            IncidentState::Monitoring,
            IncidentState::Resolved,
        ]
        .into_iter()
        .map(|state| StateOption {
            value: state.as_str(),
            label: state.label(),
            selected: form.state == state.as_str(),
        }),
    )
    .collect();
    let channels = app
        .channels
        .iter()
        .map(|channel| ChannelOption {
            id: channel.id.clone(),
            kind: channel.kind,
            checked: form.channels.contains(&channel.id),
        })
        .collect();
    let mut frame = Frame::new(shared, Some(session), "Compose");
    frame.nav = "compose";
    ComposeView {
        frame,
        key: form.key.clone(),
        incidents,
        headline: form.headline.clone(),
        body: form.body.clone(),
        states,
        next_update: form.next_update.clone(),
        audience: if form.audience.is_empty() {
            "everyone".into()
        } else {
            form.audience.clone()
        },
        orders: form.orders.clone(),
        channels,
        error,
        time_zone: app.config.brand.time_zone.name(),
        orders_file: form.orders_file.clone(),
        orders_file_name: form.orders_file_name.clone(),
        orders_file_lines: form
            .orders_file
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count(),
        confirm: None,
        body_placeholder: if form.state == IncidentState::Resolved.as_str() {
            "Say what was fixed and what customers should do now, for example: Activations work \
             again. Lines ordered today work by 18:00."
        } else {
            ""
        },
        previews,
    }
}

/// "This update goes to 12,403 emails and 3,221 texts, and is posted once on status and
/// partners": who the previewed update reaches, per kind of contact and by name for the
/// channels that post once. None when the audience cannot be counted.
async fn confirm_step(
    shared: &Shared,
    form: &ComposeForm,
    previewed: &EachPreviewed,
) -> Option<ConfirmStep> {
    let app = shared.console.api.app();
    let counts = match crate::dispatch::plan::audience_counts(
        app.store.as_ref(),
        &previewed.update,
        &app.channels,
    )
    .await
    {
        Ok(counts) => counts,
        Err(error) => {
            tracing::warn!(%error, "console: the audience could not be counted");
            return None;
        }
    };
    let mut messages: Vec<(crate::domain::ContactKind, u64)> = Vec::new();
    let mut posts = Vec::new();
    for channel in app.channels.iter().filter(|c| counts.contains_key(&c.id)) {
        let count = counts[&channel.id];
        match channel.reach() {
            crate::channel::Reach::Subscribers(kind) => {
                match messages.iter_mut().find(|(k, _)| *k == kind) {
                    Some((_, sum)) => *sum += count,
                    None => messages.push((kind, count)),
                }
            }
            crate::channel::Reach::Broadcast { .. } if count > 0 => posts.push(channel.id.clone()),
            crate::channel::Reach::Broadcast { .. } => {}
        }
    }
    let messages: Vec<String> = messages
        .into_iter()
        .map(|(kind, count)| format!("{} {}", thousands(count), kind.message_noun(count)))
        .collect();
    let reach = match (messages.is_empty(), posts.is_empty()) {
        (false, false) => format!(
            "This update goes to {}, and is posted once on {}.",
            and_list(&messages),
            and_list(&posts)
        ),
        (false, true) => format!("This update goes to {}.", and_list(&messages)),
        (true, false) => format!("This update is posted once on {}.", and_list(&posts)),
        (true, true) => {
            "This update reaches nobody: no channel chosen reaches its audience.".into()
        }
    };
    Some(ConfirmStep {
        reach,
        digest: form.audience_digest(),
    })
}

/// Every channel's rendering of the form as it stands, or why there is none yet.
async fn preview(shared: &Shared, session: &Session, form: &ComposeForm) -> PreviewsView {
    match previewed(shared, session, form).await {
        Ok(Some(previewed)) => PreviewsView::of(previewed),
        Ok(None) => PreviewsView::default(),
        Err(reason) => PreviewsView::failed(reason),
    }
}

/// The form drafted as an update and rendered for every channel; None while the update is
/// empty, and why when it cannot be drafted.
async fn previewed(
    shared: &Shared,
    session: &Session,
    form: &ComposeForm,
) -> Result<Option<EachPreviewed>, String> {
    if form.body.trim().is_empty() {
        return Ok(None);
    }
    let app = shared.console.api.app();
    let request = form.to_request(
        &shared.console.channel_ids(),
        Utc::now(),
        app.config.brand.time_zone,
    )?;
    let draft = request
        .into_draft(&app.config, session.name.clone())
        .map_err(|error| error.to_string())?;
    app.preview_each(draft)
        .await
        .map(Some)
        .map_err(|error| error.to_string())
}

/// The compose form posted: Preview renders it, Send stores it and shows its progress. The
/// script asks for the previews alone (`X-Crier-Fragment: previews`) while the lead types.
async fn compose(
    State(shared): State<Shared>,
    axum::Extension(session): axum::Extension<Session>,
    request: Request,
) -> Response {
    let fragment = request
        .headers()
        .get("x-crier-fragment")
        .is_some_and(|v| v.as_bytes() == b"previews");
    let form = match read_compose_form(request, &shared).await {
        Ok(form) => form,
        Err(reason) => {
            return message(
                &shared,
                Some(&session),
                StatusCode::BAD_REQUEST,
                "The form could not be read",
                &reason,
                ("/admin", "Back to the console"),
            );
        }
    };
    let console = &shared.console;
    if !console
        .sessions
        .csrf_holds(&session, &form.csrf, Utc::now())
    {
        tracing::warn!(who = %session.name, "console: a compose form without this session's CSRF token was refused");
        // What was typed is shown again, with a token that holds: nothing is lost.
        let view = compose_view(
            &shared,
            &session,
            &form,
            Some(
                "The form came without this session's token, so nothing was sent. Check it and press Send again."
                    .into(),
            ),
            PreviewsView::default(),
        )
        .await;
        return console.render(StatusCode::FORBIDDEN, "compose", &view);
    }
    if fragment {
        let previews = preview(&shared, &session, &form).await;
        return console.render(StatusCode::OK, "previews", &previews);
    }
    if form.action != "send" {
        let previews = preview(&shared, &session, &form).await;
        let view = compose_view(&shared, &session, &form, None, previews).await;
        return console.render(StatusCode::OK, "compose", &view);
    }
    // Nothing goes out before the lead has seen who it reaches (and has not changed the
    // audience since).
    // An update that cannot be sent as it is goes on to Send, which says why.
    if form.confirmed != form.audience_digest()
        && let Ok(Some(previewed)) = previewed(&shared, &session, &form).await
        && previewed.channels.iter().all(|c| c.rendered.is_ok())
        && let Some(confirm) = confirm_step(&shared, &form, &previewed).await
    {
        let previews = PreviewsView::of(previewed);
        let mut view = compose_view(&shared, &session, &form, None, previews).await;
        view.confirm = Some(confirm);
        return console.render(StatusCode::OK, "compose", &view);
    }
    match send(&shared, &session, &form).await {
        Ok(update) => Redirect::to(&format!("/admin/updates/{update}")).into_response(),
        Err(refusal) => {
            let mut form = form;
            let reason = match refusal {
                SendRefusal::Invalid(reason) => reason,
                SendRefusal::AlreadySent => {
                    // A fresh key, so pressing Send again sends this text as a new update.
                    form.key = form_key();
                    "This page already sent an update, and its text has changed since. Press \
                     Send again to send this one as a new update."
                        .to_owned()
                }
            };
            let previews = preview(&shared, &session, &form).await;
            let view = compose_view(&shared, &session, &form, Some(reason), previews).await;
            console.render(StatusCode::UNPROCESSABLE_ENTITY, "compose", &view)
        }
    }
}

async fn read_compose_form(request: Request, shared: &Shared) -> Result<ComposeForm, String> {
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if multipart {
        let multipart = Multipart::from_request(request, shared)
            .await
            .map_err(|e| format!("the form could not be read: {e}"))?;
        ComposeForm::from_multipart(multipart).await
    } else {
        let body = Bytes::from_request(request, shared)
            .await
            .map_err(|e| format!("the form could not be read: {e}"))?;
        Ok(ComposeForm::from_urlencoded(&body))
    }
}

/// Sends the form's update through the same path as `POST /api/updates`; the form's key
/// makes a second press of Send (or the browser resubmitting) answer with the first update.
async fn send(shared: &Shared, session: &Session, form: &ComposeForm) -> Result<Ulid, SendRefusal> {
    let zone = shared.console.api.app().config.brand.time_zone;
    let request = form
        .to_request(&shared.console.channel_ids(), Utc::now(), zone)
        .map_err(SendRefusal::Invalid)?;
    // The key is bound to the form as typed, not to the request made of it: "16:30" makes a
    // different wait a minute later, and pressing Send again must still be the same update.
    let typed = (
        &form.incident,
        &form.headline,
        &form.body,
        &form.state,
        &form.next_update,
        &form.audience,
        &form.orders,
        &form.orders_file,
        &form.channels,
    );
    let bytes = serde_json::to_vec(&typed).map_err(|e| SendRefusal::Invalid(e.to_string()))?;
    let key = (!form.key.trim().is_empty()).then(|| format!("console:{}", form.key.trim()));
    let AcceptAnswer { body, .. } = accept_update(
        &shared.console.api,
        request,
        &bytes,
        session.name.clone(),
        key,
    )
    .await
    .map_err(|error| {
        if error.code() == "idempotency_key_reused" {
            // The page was sent once already and then changed (the lead went back to it).
            SendRefusal::AlreadySent
        } else {
            SendRefusal::Invalid(error.detail().to_owned())
        }
    })?;
    let accepted: Accepted =
        serde_json::from_str(&body).map_err(|e| SendRefusal::Invalid(e.to_string()))?;
    Ulid::from_string(&accepted.update).map_err(|e| SendRefusal::Invalid(e.to_string()))
}

/// Why Send stored nothing.
enum SendRefusal {
    /// The update is refused, in words: over a channel's limit, a bad order number…
    Invalid(String),
    /// This page's form already sent a different update.
    AlreadySent,
}

// ---- progress --------------------------------------------------------------------------------

#[derive(Serialize)]
struct ProgressView {
    id: String,
    csrf: String,
    #[serde(rename = "final")]
    is_final: bool,
    state_text: String,
    channels: Vec<ChannelCounts>,
    totals: Counts,
    has_failures: bool,
}

#[derive(Serialize)]
struct ChannelCounts {
    channel: String,
    counts: Counts,
}

#[derive(Serialize)]
struct ProgressPageView {
    #[serde(flatten)]
    frame: Frame,
    #[serde(flatten)]
    progress: ProgressView,
    headline: String,
    state_label: &'static str,
    created_at_text: String,
    author: String,
    incident: String,
    incident_title: String,
}

fn parse_id(text: &str) -> Option<Ulid> {
    Ulid::from_string(text.trim()).ok()
}

async fn progress_view(
    shared: &Shared,
    session: &Session,
    id: Ulid,
) -> crate::Result<ProgressView> {
    let progress = crate::reports::progress(shared.store.as_ref(), id).await?;
    let totals = progress.totals();
    let waiting = totals.queued + totals.in_flight;
    let is_final = progress.planned && waiting == 0 && totals.retrying == 0;
    let state_text = if !progress.planned {
        "Planning the deliveries…".to_owned()
    } else if waiting > 0 {
        format!("Delivering: {waiting} to go.")
    } else if totals.retrying > 0 {
        format!(
            "Waiting to retry {} deliver{}.",
            totals.retrying,
            if totals.retrying == 1 { "y" } else { "ies" }
        )
    } else if totals.dead > 0 {
        format!("Done: every delivery is final, and {} failed.", totals.dead)
    } else {
        "Done: every delivery is final.".to_owned()
    };
    Ok(ProgressView {
        id: id.to_string(),
        csrf: shared.console.sessions.csrf(session),
        is_final,
        state_text,
        has_failures: totals.dead + totals.retrying > 0,
        totals,
        channels: progress
            .channels
            .into_iter()
            .map(|(channel, counts)| ChannelCounts { channel, counts })
            .collect(),
    })
}

fn not_found(shared: &Shared, session: &Session, what: &str) -> Response {
    message(
        shared,
        Some(session),
        StatusCode::NOT_FOUND,
        "Not found",
        &format!("There is no {what} with that id."),
        ("/admin/incidents", "See the incidents"),
    )
}

fn store_trouble(shared: &Shared, session: &Session, error: &crate::Error) -> Response {
    if matches!(error.kind(), crate::error::ErrorKind::NotFound) {
        return not_found(shared, session, "update");
    }
    tracing::error!(%error, "console: the store could not answer");
    message(
        shared,
        Some(session),
        StatusCode::SERVICE_UNAVAILABLE,
        "Try again",
        "The store could not answer just now. Nothing was changed.",
        ("/admin", "Back to the console"),
    )
}

async fn progress_page(
    State(shared): State<Shared>,
    axum::Extension(session): axum::Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    let Some(id) = parse_id(&id) else {
        return not_found(&shared, &session, "update");
    };
    let update = match shared.store.update(id).await {
        Ok(update) => update,
        Err(error) => return store_trouble(&shared, &session, &crate::Error::from(error)),
    };
    let incident_title = shared
        .store
        .incident(update.incident)
        .await
        .map(|incident| incident.title)
        .unwrap_or_default();
    let progress = match progress_view(&shared, &session, id).await {
        Ok(progress) => progress,
        Err(error) => return store_trouble(&shared, &session, &error),
    };
    let mut frame = Frame::new(&shared, Some(&session), update.headline.as_str());
    frame.refresh = !progress.is_final;
    let view = ProgressPageView {
        frame,
        progress,
        headline: update.headline.as_str().to_owned(),
        state_label: update.state.label(),
        created_at_text: human_time(update.created_at),
        author: update.author.clone(),
        incident: update.incident.to_string(),
        incident_title,
    };
    shared.console.render(StatusCode::OK, "progress", &view)
}

/// The counts alone, for the script that refreshes them.
async fn progress_fragment(
    State(shared): State<Shared>,
    axum::Extension(session): axum::Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    let Some(id) = parse_id(&id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match progress_view(&shared, &session, id).await {
        Ok(view) => shared
            .console
            .render(StatusCode::OK, "progress_table", &view),
        Err(error) => store_trouble(&shared, &session, &error),
    }
}

#[derive(Serialize)]
struct FailuresView {
    #[serde(flatten)]
    frame: Frame,
    id: String,
    headline: String,
    failures: Vec<FailureView>,
    dead: bool,
}

#[derive(Serialize)]
struct FailureView {
    channel: String,
    recipient: String,
    state: &'static str,
    attempts: u32,
    reason: String,
    /// When the next attempt is due, for a delivery waiting to retry.
    next_attempt: Option<String>,
}

async fn failures_page(
    State(shared): State<Shared>,
    axum::Extension(session): axum::Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    let Some(id) = parse_id(&id) else {
        return not_found(&shared, &session, "update");
    };
    let report =
        match crate::reports::deliveries_report(shared.store.as_ref(), Some(id), true).await {
            Ok(report) => report,
            Err(error) => return store_trouble(&shared, &session, &error),
        };
    let failures: Vec<FailureView> = report
        .failures
        .unwrap_or_default()
        .into_iter()
        .map(|record| FailureView {
            recipient: match record.recipient.contact() {
                Some(contact) => contact.as_str().to_owned(),
                None => "one post for all".to_owned(),
            },
            state: match record.state {
                DeliveryState::Queued => "queued",
                DeliveryState::InFlight => "in flight",
                DeliveryState::Sent => "sent",
                DeliveryState::Retrying => "retrying",
                DeliveryState::Dead => "dead",
                DeliveryState::Skipped => "skipped",
            },
            attempts: record.attempts,
            next_attempt: (record.state == DeliveryState::Retrying)
                .then(|| human_time(record.due_at)),
            reason: record.last_error.unwrap_or_default(),
            channel: record.channel,
        })
        .collect();
    let headline = report.headline.unwrap_or_default();
    let view = FailuresView {
        frame: Frame::new(&shared, Some(&session), format!("Failures of {headline}")),
        id: id.to_string(),
        dead: failures.iter().any(|f| f.state == "dead"),
        headline,
        failures,
    };
    shared.console.render(StatusCode::OK, "failures", &view)
}

/// Queues the update's dead letters again, with a fresh attempt budget, and enables any
/// channel a gone endpoint had disabled: what `crier retry` does.
async fn retry_dead(
    State(shared): State<Shared>,
    axum::Extension(session): axum::Extension<Session>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if !csrf_in(&shared, &session, &body) {
        return forged(&shared, &session);
    }
    let Some(id) = parse_id(&id) else {
        return not_found(&shared, &session, "update");
    };
    let requeued = match crate::reports::retry_dead_letters(shared.store.as_ref(), Some(id)).await {
        Ok(requeued) => requeued,
        Err(error) => return store_trouble(&shared, &session, &error),
    };
    tracing::info!(who = %session.name, update = %id, requeued = requeued.count, "console: dead letters queued again");
    Redirect::to(&format!("/admin/updates/{id}")).into_response()
}

// ---- incidents -------------------------------------------------------------------------------

#[derive(Serialize)]
struct IncidentsView {
    #[serde(flatten)]
    frame: Frame,
    incidents: Vec<IncidentView>,
}

#[derive(Serialize)]
struct IncidentView {
    id: String,
    title: String,
    state: &'static str,
    state_label: &'static str,
    resolved: bool,
    created_at_text: String,
    updated_at_text: String,
    promise: Option<String>,
    updates: Vec<UpdateLine>,
}

#[derive(Serialize)]
struct UpdateLine {
    id: String,
    headline: String,
    state_label: &'static str,
    created_at_text: String,
    targeted: bool,
}

async fn incidents_page(
    State(shared): State<Shared>,
    axum::Extension(session): axum::Extension<Session>,
) -> Response {
    let incidents = match shared.store.incidents().await {
        Ok(incidents) => incidents,
        Err(error) => return store_trouble(&shared, &session, &crate::Error::from(error)),
    };
    let promises: HashMap<Ulid, chrono::DateTime<Utc>> = shared
        .promises
        .borrow()
        .iter()
        .map(|watched| (watched.promise.incident, watched.promise.due))
        .collect();
    let mut views = Vec::new();
    for incident in incidents.into_iter().take(INCIDENTS_SHOWN) {
        let mut updates = Vec::new();
        for id in incident.updates.iter().rev() {
            match shared.store.update(*id).await {
                Ok(update) => updates.push(UpdateLine {
                    id: update.id.to_string(),
                    headline: update.headline.as_str().to_owned(),
                    state_label: update.state.label(),
                    created_at_text: human_time(update.created_at),
                    targeted: !matches!(update.audience, crate::domain::Audience::Everyone),
                }),
                Err(error) => return store_trouble(&shared, &session, &crate::Error::from(error)),
            }
        }
        views.push(IncidentView {
            id: incident.id.to_string(),
            title: incident.title,
            state: incident.state.as_str(),
            state_label: incident.state.label(),
            resolved: incident.state == IncidentState::Resolved,
            created_at_text: human_time(incident.created_at),
            updated_at_text: human_time(incident.updated_at),
            promise: promises
                .get(&incident.id)
                .map(|due| format!("next update promised by {}", human_time(*due))),
            updates,
        });
    }
    let mut frame = Frame::new(&shared, Some(&session), "Incidents");
    frame.nav = "incidents";
    let view = IncidentsView {
        frame,
        incidents: views,
    };
    shared.console.render(StatusCode::OK, "incidents", &view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_part_is_laid_out_and_an_html_part_marked_for_its_frame() {
        let part = |format, text: &str| RenderedPart {
            part: "body".into(),
            text: text.into(),
            format,
        };
        let json = PartView::of(part(
            PartFormat::Json,
            r#"{"type":"update","data":{"id":1}}"#,
        ));
        assert_eq!(
            json.text,
            "{\n  \"type\": \"update\",\n  \"data\": {\n    \"id\": 1\n  }\n}"
        );
        assert!(!json.html);
        // Not JSON after all: shown as it came, never dropped.
        let broken = PartView::of(part(PartFormat::Json, "{not json"));
        assert_eq!(broken.text, "{not json");
        let html = PartView::of(part(PartFormat::Html, "<!doctype html><p>Hi</p>"));
        assert!(html.html);
        assert_eq!(html.text, "<!doctype html><p>Hi</p>");
    }

    #[test]
    fn every_console_page_template_compiles() {
        let mut pages = Handlebars::new();
        for (name, source) in TEMPLATES {
            pages
                .register_template_string(name, source)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
