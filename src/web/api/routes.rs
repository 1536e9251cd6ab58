//! The admin API's handlers, each documented by its `#[utoipa::path]`.

use super::{Api, ApiDoc, ApiError, ApiJson, Author, IMPORT_BODY_LIMIT, JSON_BODY_LIMIT};
use crate::app::UpdateRequest;
use crate::domain::{Contact, EmailAddress, FollowVia, OrderNumber, PhoneNumber};
use crate::reports::{self, DeliveriesReport, OrderReport, PreviewReport, Progress};
use crate::store::IdempotentAnswer;
use axum::Extension;
use axum::Json;
use axum::extract::{DefaultBodyLimit, Path, Query, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use ulid::Ulid;
use utoipa::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

pub(super) fn all() -> OpenApiRouter<Api> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(send_update))
        .routes(routes!(preview_update))
        .routes(routes!(update_progress))
        .routes(routes!(list_incidents))
        .routes(routes!(deliveries))
        .routes(routes!(retry_dead_letters))
        .routes(routes!(add_subscriber))
        .routes(with_body_limit(
            routes!(import_subscribers),
            IMPORT_BODY_LIMIT,
        ))
        .routes(routes!(remove_subscriber))
        .routes(routes!(order_report))
        .routes(routes!(support_link))
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
}

/// The same route with its own body limit, set closer to the handler than the API's default.
fn with_body_limit(route: UtoipaMethodRouter<Api>, limit: usize) -> UtoipaMethodRouter<Api> {
    let (schemas, paths, method_router) = route;
    (
        schemas,
        paths,
        method_router.layer(DefaultBodyLimit::max(limit)),
    )
}

fn json_answer(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn parse_ulid(what: &str, text: &str) -> Result<Ulid, ApiError> {
    Ulid::from_string(text.trim())
        .map_err(|_| ApiError::invalid(format!("'{text}' is not {what} id (a ULID)")))
}

// ---- updates ----------------------------------------------------------------------------------

/// What `POST /api/updates` answers: the update is stored and its deliveries are under way.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Accepted {
    pub update: String,
    pub incident: String,
    /// The channels it goes through.
    pub channels: Vec<String>,
    /// Where its progress is: `GET` it.
    pub progress: String,
}

/// An `Idempotency-Key` is 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|key| (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::invalid("Idempotency-Key must be 1 to 255 visible ASCII characters")
        })?;
    Ok(Some(key.to_owned()))
}

/// The earlier answer to the same key: the same status and body again, or 422 when this
/// request is not the one the key was first used for.
fn replay(earlier: IdempotentAnswer, fingerprint: &str) -> Result<AcceptAnswer, ApiError> {
    if earlier.fingerprint != fingerprint {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used for another request; use a new key for a new update",
        ));
    }
    Ok(AcceptAnswer {
        status: StatusCode::from_u16(earlier.status).unwrap_or(StatusCode::ACCEPTED),
        body: earlier.body,
        replayed: true,
    })
}

/// Send an update: the same input as `crier send`. The update is stored durably before the
/// answer, and the server plans and delivers it. With an `Idempotency-Key`, sending the same
/// request again replays the first answer and creates nothing.
#[utoipa::path(
    post,
    path = "/updates",
    tag = "updates",
    request_body = UpdateRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe: the same key and body replay the first answer")),
    responses(
        (status = 202, description = "Stored; delivering", body = Accepted),
        (status = 401, description = "No valid bearer token", body = ApiError),
        (status = 422, description = "Invalid, over a channel's limit, or the key was used for another body", body = ApiError),
    )
)]
async fn send_update(
    State(api): State<Api>,
    Extension(Author(author)): Extension<Author>,
    headers: HeaderMap,
    request: ApiJson<UpdateRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    // The key is bound to the request as parsed, not to its bytes: the same JSON sent again
    // with its keys in another order or other spacing is the same request.
    let parsed = serde_json::to_vec(&request.value).map_err(crate::Error::from)?;
    let answer = accept_update(&api, request.value, &parsed, author, key).await?;
    let mut response = json_answer(answer.status, answer.body);
    if answer.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// What accepting an update answered: its status and JSON body ([`Accepted`]), and whether
/// it is the first answer to the same `Idempotency-Key` again.
pub(crate) struct AcceptAnswer {
    pub status: StatusCode,
    pub body: String,
    pub replayed: bool,
}

/// Stores an update durably and hands it to the planner: what the API's `POST /updates` and
/// the console's Send do. `bytes` is the request in a canonical form, which an idempotency key
/// is bound to; `key` is the caller's key, scoped here to the author.
pub(crate) async fn accept_update(
    api: &Api,
    request: UpdateRequest,
    bytes: &[u8],
    author: String,
    key: Option<String>,
) -> Result<AcceptAnswer, ApiError> {
    let store = &api.app.store;
    let fingerprint: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let key = key.map(|key| format!("{author}:{key}"));
    if let Some(key) = &key
        && let Some(earlier) = store.idempotent_answer(key).await?
    {
        return replay(earlier, &fingerprint);
    }
    let draft = request.into_draft(&api.app.config, author)?;
    let composed = api.app.compose(draft).await?;
    let update = &composed.update;
    let accepted = Accepted {
        update: update.id.to_string(),
        incident: update.incident.to_string(),
        channels: update.channels.clone(),
        progress: format!("/api/updates/{}", update.id),
    };
    let body = serde_json::to_string(&accepted).map_err(crate::Error::from)?;
    let new_incident = composed.new_incident.then_some(&composed.incident);
    match key {
        Some(key) => {
            let answer = IdempotentAnswer {
                key,
                fingerprint: fingerprint.clone(),
                status: StatusCode::ACCEPTED.as_u16(),
                body: body.clone(),
                created_at: Utc::now(),
            };
            if let Some(earlier) = store
                .accept_update_once(update, new_incident, &answer)
                .await?
            {
                // Another request with the same key was accepted first.
                return replay(earlier, &fingerprint);
            }
        }
        None => {
            store.accept_update(update, new_incident).await?;
        }
    }
    tracing::info!(update = %update.id, incident = %update.incident, "update accepted");
    // The planner is gone only while the server stops; the next start plans the update.
    let _ = api.plans.send(update.id);
    Ok(AcceptAnswer {
        status: StatusCode::ACCEPTED,
        body,
        replayed: false,
    })
}

/// Render an update for every selected channel and check each channel's limits, storing
/// nothing: what `crier preview` shows.
#[utoipa::path(
    post,
    path = "/preview",
    tag = "updates",
    request_body = UpdateRequest,
    responses(
        (status = 200, description = "Every channel's rendering and its limits", body = PreviewReport),
        (status = 401, description = "No valid bearer token", body = ApiError),
        (status = 422, description = "Invalid, or over a channel's limit", body = ApiError),
    )
)]
async fn preview_update(
    State(api): State<Api>,
    Extension(Author(author)): Extension<Author>,
    request: ApiJson<UpdateRequest>,
) -> Result<Json<PreviewReport>, ApiError> {
    let draft = request.value.into_draft(&api.app.config, author)?;
    let composed = api.app.compose(draft).await?;
    Ok(Json(PreviewReport::of(&composed)))
}

/// One update's progress per channel: queued, in flight, sent, retrying, dead, skipped.
#[utoipa::path(
    get,
    path = "/updates/{id}",
    tag = "updates",
    params(("id" = String, Path, description = "The update's id")),
    responses(
        (status = 200, description = "The update's counts per channel", body = Progress),
        (status = 401, description = "No valid bearer token", body = ApiError),
        (status = 404, description = "Nothing with that id", body = ApiError),
    )
)]
async fn update_progress(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> Result<Json<Progress>, ApiError> {
    let id = parse_ulid("an update", &id)?;
    Ok(Json(reports::progress(api.app.store.as_ref(), id).await?))
}

/// An incident and its updates.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IncidentSummary {
    pub id: String,
    pub title: String,
    pub state: String,
    pub created_at: String,
    pub updated_at: String,
    /// Its updates' ids, oldest first.
    pub updates: Vec<String>,
}

/// Every incident, most recently updated first.
#[utoipa::path(
    get,
    path = "/incidents",
    tag = "updates",
    responses((status = 200, description = "The incidents, most recently updated first", body = Vec<IncidentSummary>), (status = 401, description = "No valid bearer token", body = ApiError))
)]
async fn list_incidents(State(api): State<Api>) -> Result<Json<Vec<IncidentSummary>>, ApiError> {
    let incidents = api.app.store.incidents().await?;
    Ok(Json(
        incidents
            .into_iter()
            .map(|incident| IncidentSummary {
                id: incident.id.to_string(),
                title: incident.title,
                state: incident.state.as_str().to_owned(),
                created_at: crate::render::rfc3339(incident.created_at),
                updated_at: crate::render::rfc3339(incident.updated_at),
                updates: incident.updates.iter().map(Ulid::to_string).collect(),
            })
            .collect(),
    ))
}

// ---- deliveries -------------------------------------------------------------------------------

/// Delivery counts per channel of one update (the latest when none is named), and with
/// `failed=true` the dead letters and retries.
#[utoipa::path(
    get,
    path = "/deliveries",
    tag = "deliveries",
    params(
        ("update" = Option<String>, Query, description = "The update's id [default: the latest]"),
        ("failed" = Option<bool>, Query, description = "List the failures too"),
    ),
    responses(
        (status = 200, description = "Counts per channel, and the failures when asked", body = DeliveriesReport),
        (status = 401, description = "No valid bearer token", body = ApiError),
        (status = 404, description = "Nothing with that id", body = ApiError),
        (status = 422, description = "Refused: the problem says which field and why", body = ApiError),
    )
)]
async fn deliveries(
    State(api): State<Api>,
    RawQuery(query): RawQuery,
) -> Result<Json<DeliveriesReport>, ApiError> {
    let (mut update, mut failed) = (None, false);
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "update" if !value.is_empty() => update = Some(parse_ulid("an update", &value)?),
            "update" => {}
            "failed" => {
                failed = match value.as_ref() {
                    "true" | "1" | "" => true,
                    "false" | "0" => false,
                    other => {
                        return Err(ApiError::invalid(format!(
                            "failed: '{other}' is not true or false"
                        )));
                    }
                }
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter '{other}'; known: update, failed"
                )));
            }
        }
    }
    Ok(Json(
        reports::deliveries_report(api.app.store.as_ref(), update, failed).await?,
    ))
}

#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryRequest {
    /// Only this update's dead letters [default: all of them].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Retried {
    /// Dead letters queued again, with a fresh attempt budget.
    pub requeued: usize,
    /// Channels a gone endpoint had disabled, enabled again.
    pub enabled: Vec<String>,
}

/// Queue dead letters again; the server delivers them.
#[utoipa::path(
    post,
    path = "/deliveries/retry",
    tag = "deliveries",
    request_body = RetryRequest,
    responses((status = 200, description = "How many dead letters were queued again", body = Retried), (status = 401, description = "No valid bearer token", body = ApiError), (status = 422, description = "Refused: the problem says which field and why", body = ApiError))
)]
async fn retry_dead_letters(
    State(api): State<Api>,
    request: ApiJson<RetryRequest>,
) -> Result<Json<Retried>, ApiError> {
    let update = request
        .value
        .update
        .as_deref()
        .map(|id| parse_ulid("an update", id))
        .transpose()?;
    let requeued = reports::retry_dead_letters(api.app.store.as_ref(), update).await?;
    Ok(Json(Retried {
        requeued: requeued.count,
        enabled: requeued.enabled,
    }))
}

// ---- subscribers ------------------------------------------------------------------------------

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscribeRequest {
    pub order: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// In E.164 form, like +447700900123.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// The contact was verified elsewhere; otherwise it stays pending and receives nothing.
    #[serde(default)]
    pub confirmed: bool,
}

/// A subscriber as the admin API shows it (to its admins, unmasked).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubscriberSummary {
    pub contact: String,
    /// pending, confirmed or unsubscribed.
    pub state: String,
    pub orders: Vec<String>,
}

impl SubscriberSummary {
    pub fn of(subscriber: &crate::domain::Subscriber) -> Self {
        Self {
            contact: subscriber.contact.to_string(),
            state: reports::as_text(&subscriber.state()),
            orders: subscriber
                .orders()
                .iter()
                .map(ToString::to_string)
                .collect(),
        }
    }
}

fn contact_of(email: Option<&str>, phone: Option<&str>) -> Result<Contact, ApiError> {
    Ok(match (email, phone) {
        (Some(email), None) => Contact::Email(EmailAddress::parse(email)?),
        (None, Some(phone)) => Contact::Phone(PhoneNumber::parse(phone)?),
        _ => return Err(ApiError::invalid("give an email or a phone, one of them")),
    })
}

/// Follow an order with one contact: what `crier subscribe` does.
#[utoipa::path(
    post,
    path = "/subscribers",
    tag = "subscribers",
    request_body = SubscribeRequest,
    responses((status = 200, description = "The subscriber as it is now", body = SubscriberSummary), (status = 401, description = "No valid bearer token", body = ApiError), (status = 422, description = "Refused: the problem says which field and why", body = ApiError))
)]
async fn add_subscriber(
    State(api): State<Api>,
    request: ApiJson<SubscribeRequest>,
) -> Result<Json<SubscriberSummary>, ApiError> {
    let request = request.value;
    let order = OrderNumber::parse(&request.order, &api.app.config.orders)?;
    let contact = contact_of(request.email.as_deref(), request.phone.as_deref())?;
    let subscriber = api
        .app
        .store
        .subscribe(
            &contact,
            &order,
            request.confirmed,
            FollowVia::Operator,
            Utc::now(),
        )
        .await?;
    Ok(Json(SubscriberSummary::of(&subscriber)))
}

#[derive(Debug, serde::Deserialize)]
struct ImportQuery {
    dry_run: Option<bool>,
}

/// Subscribe many at once: the body is a CSV file (`text/csv`, with an
/// `order,email,phone,confirmed` header) or JSON lines (`application/x-ndjson`), imported as
/// `crier import` does. Bad rows are reported with their line and the rest imported.
#[utoipa::path(
    post,
    path = "/subscribers/import",
    tag = "subscribers",
    request_body(content(
        (String = "text/csv"),
        (String = "application/x-ndjson"),
    )),
    responses(
        (status = 200, description = "The import's report", body = Object),
        (status = 401, description = "No valid bearer token", body = ApiError),
        (status = 413, description = "The body is over the size limit", body = ApiError),
        (status = 415, description = "The body is neither text/csv nor application/x-ndjson", body = ApiError),
    ),
    params(("dry_run" = Option<bool>, Query, description = "Check every row and report what would change, storing nothing")),
)]
async fn import_subscribers(
    State(api): State<Api>,
    Query(query): Query<ImportQuery>,
    request: Request,
) -> Result<Response, ApiError> {
    use crate::import::Format;
    let format = match super::content_type(request.headers()).as_deref() {
        Some("text/csv") => Format::Csv,
        Some("application/x-ndjson" | "application/jsonl" | "application/jsonlines") => {
            Format::JsonLines
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send a CSV file as text/csv or JSON lines as application/x-ndjson",
            ));
        }
    };
    let bytes = super::read_body(request, &()).await?;
    let report = crate::import::import(
        api.app.store.as_ref(),
        std::io::Cursor::new(bytes),
        format,
        &api.app.config.orders,
        crate::import::DEFAULT_BATCH,
        query.dry_run.unwrap_or(false),
        |_| {},
    )
    .await?;
    Ok(Json(report).into_response())
}

/// Stop updates for a contact: every order, or with `order` just that one.
#[utoipa::path(
    delete,
    path = "/subscribers/{contact}",
    tag = "subscribers",
    params(
        ("contact" = String, Path, description = "The email address or E.164 phone number"),
        ("order" = Option<String>, Query, description = "Stop only this order's updates"),
    ),
    responses(
        (status = 200, description = "The subscriber as it is now", body = SubscriberSummary),
        (status = 401, description = "No valid bearer token", body = ApiError),
        (status = 404, description = "Nothing with that id", body = ApiError),
        (status = 422, description = "Refused: the problem says which field and why", body = ApiError),
    )
)]
async fn remove_subscriber(
    State(api): State<Api>,
    Path(contact): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<SubscriberSummary>, ApiError> {
    let mut order = None;
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "order" => order = Some(OrderNumber::parse(&value, &api.app.config.orders)?),
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter '{other}'; known: order"
                )));
            }
        }
    }
    let contact = Contact::parse(&contact)?;
    let subscriber = api
        .app
        .store
        .unsubscribe(&contact, order.as_ref(), FollowVia::Operator, Utc::now())
        .await?;
    Ok(Json(SubscriberSummary::of(&subscriber)))
}

// ---- support ----------------------------------------------------------------------------------

/// For support: the latest update that applies to an order, its contacts (masked) with how
/// that update reached each, and a reply to paste.
#[utoipa::path(
    get,
    path = "/orders/{order}",
    tag = "support",
    params(("order" = String, Path, description = "The order number, as the customer gives it")),
    responses((status = 200, description = "The latest update for the order, its contacts (masked) and a reply to paste", body = OrderReport), (status = 401, description = "No valid bearer token", body = ApiError), (status = 422, description = "Refused: the problem says which field and why", body = ApiError))
)]
async fn order_report(
    State(api): State<Api>,
    Path(order): Path<String>,
) -> Result<Json<OrderReport>, ApiError> {
    let order = OrderNumber::parse(&order, &api.app.config.orders)?;
    Ok(Json(
        reports::order_report(api.app.store.as_ref(), &api.app.config, &order).await?,
    ))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkRequest {
    pub order: String,
    /// With a contact, the link subscribes it confirmed with one button.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// How long the link works, like "7d" or "12h" (an hour to 90 days) [default: 7d].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SupportLink {
    pub url: String,
    pub expires_at: String,
}

/// For support: a signed link to the subscribe page for an order, or with a contact one
/// button that subscribes that contact.
#[utoipa::path(
    post,
    path = "/links",
    tag = "support",
    request_body = LinkRequest,
    responses((status = 200, description = "A signed link to paste in a reply", body = SupportLink), (status = 401, description = "No valid bearer token", body = ApiError), (status = 422, description = "Refused: the problem says which field and why", body = ApiError))
)]
async fn support_link(
    State(api): State<Api>,
    request: ApiJson<LinkRequest>,
) -> Result<Json<SupportLink>, ApiError> {
    let request = request.value;
    let config = &api.app.config;
    let order = OrderNumber::parse(&request.order, &config.orders)?;
    let contact = match (&request.email, &request.phone) {
        (None, None) => None,
        (email, phone) => Some(contact_of(email.as_deref(), phone.as_deref())?),
    };
    let lifetime = crate::links::parse_link_lifetime(request.expires.as_deref().unwrap_or("7d"))
        .map_err(ApiError::invalid)?;
    let expires = crate::clock::after(Utc::now(), lifetime);
    let url = api
        .app
        .composer
        .link_maker()
        .support_url(&order, contact.as_ref(), expires);
    Ok(Json(SupportLink {
        url,
        expires_at: crate::render::rfc3339(expires),
    }))
}
