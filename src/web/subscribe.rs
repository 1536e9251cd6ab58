//! Subscribing from the web: the subscribe form, the confirm link it sends, and support's
//! links. Like every customer page, a GET only shows a page and state changes on POST, so a
//! mail scanner that follows every link confirms nothing.
//!
//! The form tells an attacker nothing: its answer is the same page whether or not the order
//! is followed or the contact known. It comes once the pending subscriber is durable, through
//! one store step that writes and flushes alike whatever it finds, and confirmations go out in
//! the background, so neither the page nor its timing depends on what the store holds. It is
//! protected by a double-submit
//! CSRF token (an HttpOnly, SameSite=Strict cookie and a hidden field, both signed with the
//! link secret), a honeypot field, and limits on confirmations per client address and per
//! contact: an SMS costs money, and a form that sends them is a target for SMS pumping.

use super::Shared;
use crate::app::App;
use crate::channel::{ConfiguredChannel, Notice};
use crate::domain::token::{TokenPurpose, TokenSigner};
use crate::domain::{
    Contact, ContactKind, EmailAddress, FollowVia, OrderNumber, OrderPattern, PhoneNumber,
};
use crate::links::{LinkMaker, LinkSubject, Links};
use crate::render::{BrandView, Renderer, human_time};
use crate::store::{FollowChange, FormRequest};
use axum::Form;
use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a confirm link works.
pub use crate::store::CONFIRM_TTL;
/// How long a form may stay open before its CSRF token expires.
const CSRF_TTL: Duration = Duration::from_secs(12 * 3600);
const CSRF_COOKIE: &str = "crier_csrf";
/// The same cookie on an https site. A browser accepts a `__Host-` cookie only when it is
/// `Secure`, has `Path=/` and no `Domain`, so neither a sibling subdomain nor a plain-http
/// page can plant one of its own to pair with a field it chose.
const HOST_CSRF_COOKIE: &str = "__Host-crier_csrf";
/// Confirmations one contact may be sent per [`LIMIT_WINDOW`]: enough to ask again after a
/// typo, too few to bomb a mailbox or pump an SMS number.
const PER_CONTACT: usize = 3;
/// Confirmations asked from one client address (an IPv6 /64) per [`LIMIT_WINDOW`].
const PER_CLIENT: usize = 20;
const LIMIT_WINDOW: Duration = Duration::from_secs(3600);
/// Confirmations the whole site sends per [`LIMIT_WINDOW`]: however many addresses a flood
/// comes from, it cannot pump more SMS than this.
const SITE_WIDE: usize = 500;
/// The most keys the limits remember. Past it (a flood from many addresses), no confirmation
/// is sent until the window frees room: memory stays bounded, and a flood costs no SMS.
const LIMIT_KEYS: usize = 100_000;

/// What subscribing from the web needs besides the pages': the order pattern, links, the
/// channels confirmations go through and the limits on them.
pub struct Subscriptions {
    pub(super) orders: OrderPattern,
    links: LinkMaker,
    /// The first email channel, and the first SMS channel: confirmations go through them.
    email: Option<ConfiguredChannel>,
    sms: Option<ConfiguredChannel>,
    limits: Limits,
    /// The proxies whose `X-Forwarded-For` names the client the limits count.
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Whether the public site is https, so the CSRF cookie may say `Secure`.
    secure: bool,
    /// The form's line on what is kept and how to stop.
    keep_note: String,
}

impl Subscriptions {
    pub fn new(app: &App) -> Self {
        let first = |kind: &str| app.channels.iter().find(|c| c.kind == kind).cloned();
        let links = app.composer.link_maker().clone();
        let (email, sms) = (first("email"), first("sms"));
        let keep_note = match &app.config.brand.subscribe_note {
            Some(note) => note.clone(),
            None => default_keep_note(sms.is_some()),
        };
        Self {
            keep_note,
            orders: app.config.orders.clone(),
            secure: links.public_url().starts_with("https://"),
            links,
            email,
            sms,
            limits: Limits::default(),
            trusted_proxies: app.config.trusted_proxies.clone(),
        }
    }

    fn signer(&self) -> &TokenSigner {
        self.links.signer()
    }

    fn csrf_cookie(&self) -> &'static str {
        if self.secure {
            HOST_CSRF_COOKIE
        } else {
            CSRF_COOKIE
        }
    }

    /// A fresh CSRF token, and the cookie that carries it.
    pub(super) fn csrf(&self) -> (String, HeaderValue) {
        let nonce = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 18]>());
        let token = self.signer().issue(
            TokenPurpose::Csrf,
            &nonce,
            crate::clock::after(Utc::now(), CSRF_TTL),
        );
        let cookie =
            super::strict_cookie(self.csrf_cookie(), &token, CSRF_TTL.as_secs(), self.secure);
        (token, cookie)
    }

    /// Whether the form's field and the cookie carry the same genuine, unexpired token.
    pub(super) fn csrf_holds(&self, headers: &HeaderMap, field: &str) -> bool {
        let Some(cookie) = cookie(headers, self.csrf_cookie()) else {
            return false;
        };
        super::same_secret(cookie.as_bytes(), field.as_bytes())
            && self
                .signer()
                .verify(TokenPurpose::Csrf, field, Utc::now())
                .is_ok()
    }

    fn offer(&self) -> Offer {
        Offer::new(self.email.is_some(), self.sms.is_some())
    }

    fn channel_for(&self, contact: &Contact) -> Option<&ConfiguredChannel> {
        match contact.kind() {
            ContactKind::Email => self.email.as_ref(),
            ContactKind::Phone => self.sms.as_ref(),
        }
    }
}

/// What the form says is kept and how to stop, unless `brand.subscribe_note` says otherwise.
fn default_keep_note(texts: bool) -> String {
    let stop = if texts {
        "Every email has a link to stop them, and you can reply STOP to any text."
    } else {
        "Every email has a link to stop them."
    };
    format!(
        "We keep your order number and the contact you give only to send you updates on that order. {stop}"
    )
}

/// The value of one cookie of the request.
pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

// ---- limits ---------------------------------------------------------------------------------

/// The key of the site-wide count.
const SITE_KEY: &str = "site";

/// Sliding windows in memory: when each client address and each contact was last sent a
/// confirmation. A restart forgets them, which costs at most one window's allowance.
#[derive(Default)]
struct Limits {
    seen: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl Limits {
    /// Whether one more confirmation may go to `contact` for `client`; if so, it is counted.
    fn allow(&self, client: &str, contact: &Contact, now: Instant) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let recent = |times: &mut VecDeque<Instant>| {
            while times
                .front()
                .is_some_and(|at| now.duration_since(*at) >= LIMIT_WINDOW)
            {
                times.pop_front();
            }
            times.len()
        };
        let (client_key, contact_key) = (format!("client {client}"), format!("contact {contact}"));
        if seen.len() + 2 > LIMIT_KEYS {
            seen.retain(|_, times| recent(times) > 0);
            if seen.len() + 2 > LIMIT_KEYS {
                return false;
            }
        }
        let by_client = seen.get_mut(&client_key).map_or(0, recent);
        let by_contact = seen.get_mut(&contact_key).map_or(0, recent);
        let site_wide = seen.get_mut(SITE_KEY).map_or(0, recent);
        if by_client >= PER_CLIENT || by_contact >= PER_CONTACT || site_wide >= SITE_WIDE {
            return false;
        }
        seen.entry(client_key).or_default().push_back(now);
        seen.entry(contact_key).or_default().push_back(now);
        seen.entry(SITE_KEY.to_owned()).or_default().push_back(now);
        true
    }
}

/// The address the request came from: the TCP peer, or, when the peer is a trusted proxy, the
/// nearest address in `X-Forwarded-For` that is not one; an IPv6 client by its /64, which one
/// host usually holds whole. Unknown when the server was not started with connection info.
pub(super) struct Client(String);

impl FromRequestParts<Shared> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        shared: &Shared,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(address)| address.ip());
        let trusted = &shared.subscriptions.trusted_proxies;
        let address = peer.map(|peer| client_address(peer, &parts.headers, trusted));
        Ok(Client(match address {
            Some(IpAddr::V6(ip)) => match ip.to_ipv4_mapped() {
                Some(ip) => ip.to_string(),
                None => {
                    let s = ip.segments();
                    format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
                }
            },
            Some(IpAddr::V4(ip)) => ip.to_string(),
            None => "unknown".to_owned(),
        }))
    }
}

/// Who sent a request that reached crier from `peer`. Each trusted proxy appends the address
/// it was reached from to `X-Forwarded-For`, so reading from the right, the first address no
/// trusted proxy holds is the client's; what lies left of it the client wrote, and is not
/// believed (nor read: garbage there changes nothing). A hop that cannot be read before the
/// client is found leaves the last trusted address as the client.
fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let values: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|value| value.to_str().unwrap_or(""))
        .collect();
    let mut client = peer;
    for hop in values.iter().rev().flat_map(|value| value.rsplit(',')) {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) if is_trusted(&ip) => client = ip,
            Ok(ip) => return ip,
            Err(_) => return client,
        }
    }
    client
}

// ---- pages ----------------------------------------------------------------------------------

#[derive(Serialize, Default)]
struct FormView<'a> {
    brand: Option<&'a BrandView>,
    links: Option<&'a Links>,
    sent: bool,
    /// The contact kinds a configured channel can send a confirmation to: the form offers
    /// only those.
    offer: Offer,
    /// One line on what is kept and how to stop.
    keep_note: &'a str,
    csrf: String,
    order: String,
    email: String,
    phone: String,
    form_error: Option<String>,
    order_error: Option<String>,
    email_error: Option<String>,
    phone_error: Option<String>,
}

/// Which contact fields the form shows.
#[derive(Serialize, Default, Clone, Copy)]
struct Offer {
    email: bool,
    phone: bool,
    /// Both, so the page says "or both".
    both: bool,
    /// Neither: no channel can confirm a subscription, so there is no form.
    none: bool,
}

impl Offer {
    fn new(email: bool, phone: bool) -> Self {
        Self {
            email,
            phone,
            both: email && phone,
            none: !email && !phone,
        }
    }
}

#[derive(Serialize, Default)]
struct ConfirmView<'a> {
    brand: Option<&'a BrandView>,
    links: Option<&'a Links>,
    order: String,
    contact: String,
    ask: bool,
    done: bool,
    invalid: bool,
    /// A genuine link that an opt-out after it made void.
    voided: bool,
}

/// What the confirmation's templates see.
#[derive(Serialize)]
struct NoticeView<'a> {
    brand: &'a BrandView,
    links: &'a Links,
    order: &'a str,
    confirm_url: &'a str,
    /// The text may ask for a YES: replies to its channel come back to crier.
    reply_yes: bool,
    expires_text: String,
}

fn render<T: Serialize>(renderer: &Renderer, name: &str, status: StatusCode, view: &T) -> Response {
    match renderer.render(name, view) {
        Ok(page) => (status, Html(page)).into_response(),
        Err(error) => {
            tracing::error!(%error, "cannot render {name}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page cannot be shown\n",
            )
                .into_response()
        }
    }
}

impl Shared {
    fn form_page(&self, status: StatusCode, view: FormView<'_>) -> Response {
        let subscriptions = &self.subscriptions;
        let view = FormView {
            brand: Some(&self.pages.brand),
            links: Some(&self.pages.links),
            offer: subscriptions.offer(),
            keep_note: &subscriptions.keep_note,
            ..view
        };
        let mut response = render(&self.pages.renderer, "pages/subscribe", status, &view);
        // The form and its answers hold a CSRF token or the customer's input: never cached.
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }

    /// A form with a fresh CSRF token, and the cookie that matches it.
    fn fresh_form(&self, status: StatusCode, view: FormView<'_>) -> Response {
        let (csrf, cookie) = self.subscriptions.csrf();
        let mut response = self.form_page(status, FormView { csrf, ..view });
        response.headers_mut().insert(header::SET_COOKIE, cookie);
        response
    }

    fn confirm_page(&self, status: StatusCode, view: ConfirmView<'_>) -> Response {
        let view = ConfirmView {
            brand: Some(&self.pages.brand),
            links: Some(&self.pages.links),
            ..view
        };
        render(&self.pages.renderer, "pages/confirm", status, &view)
    }

    fn invalid_link(&self) -> Response {
        self.confirm_page(
            StatusCode::BAD_REQUEST,
            ConfirmView {
                invalid: true,
                ..ConfirmView::default()
            },
        )
    }

    /// The subject of a genuine link made for `purpose`.
    fn link(&self, purpose: TokenPurpose, token: &str) -> Option<LinkSubject> {
        let subscriptions = &self.subscriptions;
        LinkSubject::verify(
            subscriptions.signer(),
            purpose,
            token,
            &subscriptions.orders,
            Utc::now(),
        )
        .ok()
    }

    /// Confirms exactly the follow a link names (its contact and its order), and says so.
    /// Other orders anyone added for the contact stay as they are: each waits for its own
    /// confirmation. A link made before the contact opted out (or left the order) confirms
    /// nothing: only a new request brings it back.
    async fn follow_confirmed(
        &self,
        link: &LinkSubject,
        contact: &Contact,
        via: FollowVia,
    ) -> Response {
        let order = &link.order;
        let change = FollowChange::FollowByLink {
            order: order.clone(),
            via,
            issued: link.issued,
        };
        let followed = match self
            .store
            .change_follows(contact, &change, Utc::now())
            .await
        {
            Ok(followed) => followed,
            Err(error) => {
                tracing::error!(%error, "cannot confirm a subscription");
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not done: please try again in a minute\n",
                )
                    .into_response();
            }
        };
        if !followed.subscriber.receives(order) {
            tracing::info!(contact = %contact.masked(), %order, "a link made before the contact opted out confirmed nothing");
            return self.voided_link(StatusCode::GONE);
        }
        tracing::info!(contact = %contact.masked(), %order, "subscription confirmed");
        self.confirm_page(
            StatusCode::OK,
            ConfirmView {
                order: order.to_string(),
                contact: contact.masked(),
                done: true,
                ..ConfirmView::default()
            },
        )
    }

    /// The page of a genuine link an opt-out made void.
    fn voided_link(&self, status: StatusCode) -> Response {
        self.confirm_page(
            status,
            ConfirmView {
                voided: true,
                ..ConfirmView::default()
            },
        )
    }

    /// The page a link that names a contact opens: the question, unless the contact opted out
    /// after the link was made.
    async fn ask_by_link(&self, link: &LinkSubject, contact: &Contact) -> Response {
        match self.store.subscriber(contact).await {
            Ok(Some(subscriber)) if !subscriber.honours_link(&link.order, link.issued) => {
                self.voided_link(StatusCode::OK)
            }
            // Asking changes nothing: if the store cannot tell, the answer will.
            _ => self.ask(&link.order, contact, StatusCode::OK),
        }
    }

    fn ask(&self, order: &OrderNumber, contact: &Contact, status: StatusCode) -> Response {
        self.confirm_page(
            status,
            ConfirmView {
                order: order.to_string(),
                contact: contact.masked(),
                ask: true,
                ..ConfirmView::default()
            },
        )
    }
}

#[derive(Deserialize)]
pub(super) struct FormQuery {
    order: Option<String>,
}

/// GET /subscribe: the form, the order filled in from `?order=`.
pub(super) async fn subscribe_form(
    State(shared): State<Shared>,
    query: Result<Query<FormQuery>, QueryRejection>,
) -> Response {
    let order = query
        .ok()
        .and_then(|Query(query)| query.order)
        .map(|order| order.chars().take(100).collect())
        .unwrap_or_default();
    shared.fresh_form(
        StatusCode::OK,
        FormView {
            order,
            ..FormView::default()
        },
    )
}

#[derive(Deserialize, Default)]
pub(super) struct SubscribeForm {
    #[serde(default)]
    order: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    phone: String,
    #[serde(default)]
    csrf: String,
    /// The honeypot: hidden from people, filled in by bots that fill in every field.
    #[serde(default)]
    website: String,
}

/// The most of a field kept to show again: enough for any real input.
fn kept(text: &str) -> String {
    text.chars().take(200).collect()
}

/// POST /subscribe: stores a pending subscriber for each contact given and sends each a
/// confirmation, answering the same page whatever the store holds.
pub(super) async fn subscribe(
    State(shared): State<Shared>,
    Client(client): Client,
    headers: HeaderMap,
    form: Result<Form<SubscribeForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return shared.fresh_form(
            StatusCode::BAD_REQUEST,
            FormView {
                form_error: Some("The form did not arrive whole: please send it again.".into()),
                ..FormView::default()
            },
        );
    };
    let typed = FormView {
        order: kept(&form.order),
        email: kept(&form.email),
        phone: kept(&form.phone),
        ..FormView::default()
    };
    if !shared.subscriptions.csrf_holds(&headers, &form.csrf) {
        tracing::info!("subscribe form refused: its CSRF token is missing or does not match");
        return shared.fresh_form(
            StatusCode::FORBIDDEN,
            FormView {
                form_error: Some(
                    "This form expired or did not come from our page, so nothing was stored. \
                     Please check it and send it again."
                        .into(),
                ),
                ..typed
            },
        );
    }
    let sent = FormView {
        sent: true,
        ..FormView::default()
    };
    if !form.website.is_empty() {
        tracing::info!("subscribe form ignored: its honeypot field was filled in");
        return shared.form_page(StatusCode::OK, sent);
    }
    let orders = &shared.subscriptions.orders;
    let order = OrderNumber::parse(&form.order, orders);
    let email = (!form.email.trim().is_empty()).then(|| EmailAddress::parse(&form.email));
    let phone = (!form.phone.trim().is_empty()).then(|| PhoneNumber::parse(&form.phone));
    let mut errors = FormView {
        csrf: form.csrf.clone(),
        ..typed
    };
    let mut invalid = false;
    if order.is_err() {
        errors.order_error =
            Some("That is not an order number: check the confirmation of your order.".into());
        invalid = true;
    }
    if matches!(email, Some(Err(_))) {
        errors.email_error = Some("That is not an email address.".into());
        invalid = true;
    }
    if matches!(phone, Some(Err(_))) {
        errors.phone_error = Some(
            "That is not a mobile number: write it with its country code, like +44 7700 900123."
                .into(),
        );
        invalid = true;
    }
    let offer = shared.subscriptions.offer();
    if offer.none {
        errors.form_error = Some(
            "We cannot take subscriptions here yet: please follow this page for updates.".into(),
        );
        invalid = true;
    } else if email.is_some() && !offer.email {
        // The form has no such field: the page says it at the top.
        errors.form_error =
            Some("We cannot send email updates yet: give a mobile number instead.".into());
        invalid = true;
    } else if phone.is_some() && !offer.phone {
        errors.form_error =
            Some("We cannot send text messages yet: give an email address instead.".into());
        invalid = true;
    }
    if email.is_none() && phone.is_none() && !offer.none {
        errors.form_error = Some(
            match (offer.email, offer.phone) {
                (true, true) => "Give an email address, a mobile number, or both.",
                (true, false) => "Give your email address.",
                _ => "Give your mobile number.",
            }
            .into(),
        );
        invalid = true;
    }
    let (Ok(order), false) = (order, invalid) else {
        return shared.form_page(StatusCode::UNPROCESSABLE_ENTITY, errors);
    };
    let contacts = [
        email.and_then(Result::ok).map(Contact::Email),
        phone.and_then(Result::ok).map(Contact::Phone),
    ];
    let subscriptions = &shared.subscriptions;
    let mut to_ask = Vec::new();
    for contact in contacts.into_iter().flatten() {
        let masked = contact.masked();
        let Some(channel) = subscriptions.channel_for(&contact) else {
            tracing::warn!(contact = %masked, "no channel can send this contact a confirmation");
            continue;
        };
        // Durable before the answer: a customer told "thank you" is on file even if the
        // server dies next. The store decides and writes in one step that takes as long
        // whatever it holds.
        match shared
            .store
            .request_subscription(&contact, &order, &channel.id, Utc::now())
            .await
        {
            Ok(FormRequest::AskToConfirm) => to_ask.push((contact, channel.clone())),
            Ok(FormRequest::AlreadyFollowing) => {
                tracing::info!(contact = %masked, %order, "confirmation not sent: already confirmed");
            }
            Ok(FormRequest::MustNotMessage) => {
                tracing::info!(contact = %masked, channel = %channel.id, "confirmation not sent: the contact must not be messaged from a form");
            }
            Err(error) => {
                tracing::error!(%error, contact = %masked, "cannot store the pending subscriber");
                return shared.fresh_form(
                    StatusCode::SERVICE_UNAVAILABLE,
                    FormView {
                        order: kept(&form.order),
                        email: kept(&form.email),
                        phone: kept(&form.phone),
                        form_error: Some(
                            "We could not take your request just now. Please send it again in a minute."
                                .into(),
                        ),
                        ..FormView::default()
                    },
                );
            }
        }
    }
    for (contact, channel) in to_ask {
        // The limits count requests in the order they arrive, so they are taken here, in
        // memory, whatever they decide; the answer is the same either way.
        if !subscriptions
            .limits
            .allow(&client, &contact, Instant::now())
        {
            tracing::warn!(contact = %contact.masked(), client, "confirmation not sent: over the limit");
            continue;
        }
        // In the background: the answer, and how long it takes, must not depend on how fast a
        // provider answers.
        let (shared, order) = (shared.clone(), order.clone());
        tokio::spawn(async move { send_confirmation(&shared, &order, &contact, &channel).await });
    }
    shared.form_page(StatusCode::OK, sent)
}

/// Sends `contact` a confirm link for `order` through `channel` (the limits were taken). Everything
/// that goes wrong is logged (the contact masked, never the link).
async fn send_confirmation(
    shared: &Shared,
    order: &OrderNumber,
    contact: &Contact,
    channel: &ConfiguredChannel,
) {
    let subscriptions = &shared.subscriptions;
    let masked = contact.masked();
    let now = Utc::now();
    let confirm_url = subscriptions
        .links
        .confirm_url(contact, order, now, CONFIRM_TTL);
    // A text may ask for a YES only where replies come back to crier.
    let reply_yes = contact.kind() == ContactKind::Phone && shared.inbound.hears(&channel.id);
    let notice = match notice(shared, contact, order, &confirm_url, reply_yes, now) {
        Ok(notice) => notice,
        Err(error) => {
            tracing::error!(%error, "cannot render the confirmation");
            return;
        }
    };
    match channel.adapter.notify(contact, &notice).await {
        Ok(_) => {
            tracing::info!(contact = %masked, channel = %channel.id, "confirmation sent");
            if reply_yes {
                // A YES answers this text: it confirms this order, and no other.
                let asked = FollowChange::AskedByText {
                    orders: [order.clone()].into(),
                    until: crate::clock::after(now, CONFIRM_TTL),
                };
                if let Err(error) = shared
                    .store
                    .change_follows(contact, &asked, Utc::now())
                    .await
                {
                    tracing::warn!(%error, contact = %masked, "a YES to the confirmation will not be understood");
                }
            }
        }
        Err(error) => {
            // The provider's own words often quote the address or number: log only its codes.
            tracing::warn!(
                contact = %masked,
                channel = %channel.id,
                kind = ?error.kind,
                status = ?error.status,
                code = ?error.code,
                "confirmation not sent"
            );
        }
    }
}

fn notice(
    shared: &Shared,
    contact: &Contact,
    order: &OrderNumber,
    confirm_url: &str,
    reply_yes: bool,
    now: chrono::DateTime<Utc>,
) -> Result<Notice, crate::render::RenderError> {
    let view = NoticeView {
        brand: &shared.pages.brand,
        links: &shared.pages.links,
        order: order.as_str(),
        confirm_url,
        reply_yes,
        expires_text: human_time(crate::clock::after(now, CONFIRM_TTL)),
    };
    let renderer = &shared.pages.renderer;
    Ok(match contact.kind() {
        ContactKind::Email => Notice {
            subject: renderer.render("confirm.subject", &view)?,
            text: renderer.render("confirm.txt", &view)?,
            html: renderer.render("confirm.html", &view)?,
        },
        ContactKind::Phone => Notice {
            subject: String::new(),
            text: renderer.render("confirm.sms", &view)?,
            html: String::new(),
        },
    })
}

/// GET /confirm/{token}: asks, changes nothing.
pub(super) async fn confirm_page(
    State(shared): State<Shared>,
    Path(token): Path<String>,
) -> Response {
    match shared.link(TokenPurpose::Confirm, &token) {
        Some(link) => match &link.contact {
            Some(contact) => shared.ask_by_link(&link, contact).await,
            None => shared.invalid_link(),
        },
        None => shared.invalid_link(),
    }
}

/// POST /confirm/{token}: the button's form (`confirm=yes`) confirms.
pub(super) async fn confirm(
    State(shared): State<Shared>,
    Path(token): Path<String>,
    body: Bytes,
) -> Response {
    confirm_by_link(&shared, TokenPurpose::Confirm, &token, &body).await
}

/// GET /s/{token}: a support link. One that names a contact asks to subscribe it; one that
/// names only an order opens the form with the order filled in.
pub(super) async fn support_page(
    State(shared): State<Shared>,
    Path(token): Path<String>,
) -> Response {
    let Some(link) = shared.link(TokenPurpose::SupportLink, &token) else {
        return shared.invalid_link();
    };
    match &link.contact {
        Some(contact) => shared.ask_by_link(&link, contact).await,
        None => shared.fresh_form(
            StatusCode::OK,
            FormView {
                order: link.order.to_string(),
                ..FormView::default()
            },
        ),
    }
}

/// POST /s/{token}: subscribes the contact the link names, confirmed: the link reached the
/// customer in support's own reply to them, so a second confirmation would ask nothing new.
pub(super) async fn support(
    State(shared): State<Shared>,
    Path(token): Path<String>,
    body: Bytes,
) -> Response {
    confirm_by_link(&shared, TokenPurpose::SupportLink, &token, &body).await
}

/// The POST of a link that names a contact (a confirm link, or a support link): the button's
/// form (`confirm=yes`) subscribes the contact to the link's order, confirmed.
async fn confirm_by_link(
    shared: &Shared,
    purpose: TokenPurpose,
    token: &str,
    body: &[u8],
) -> Response {
    let Some(link) = shared.link(purpose, token) else {
        return shared.invalid_link();
    };
    let Some(contact) = &link.contact else {
        return shared.invalid_link();
    };
    if !String::from_utf8_lossy(body).contains("confirm=yes") {
        return shared.ask(&link.order, contact, StatusCode::BAD_REQUEST);
    }
    let via = match purpose {
        TokenPurpose::SupportLink => FollowVia::SupportLink,
        _ => FollowVia::ConfirmLink,
    };
    shared.follow_confirmed(&link, contact, via).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann() -> Contact {
        Contact::parse("ann@example.com").unwrap()
    }

    #[test]
    fn the_client_is_the_nearest_address_no_trusted_proxy_holds() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let forwarded = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append("x-forwarded-for", HeaderValue::from_str(value).unwrap());
            }
            headers
        };
        let client = |peer: &str, headers: &HeaderMap| client_address(ip(peer), headers, &trusted);
        // A client that writes the header itself is not believed.
        assert_eq!(
            client("192.0.2.7", &forwarded(&["198.51.100.1"])),
            ip("192.0.2.7")
        );
        // Behind one proxy, and behind two, whatever the client prepended.
        assert_eq!(
            client("10.0.0.2", &forwarded(&["198.51.100.1"])),
            ip("198.51.100.1")
        );
        assert_eq!(
            client(
                "10.0.0.2",
                &forwarded(&["203.0.113.9, 198.51.100.1", "10.0.0.3"])
            ),
            ip("198.51.100.1")
        );
        assert_eq!(
            client("10.0.0.2", &forwarded(&["2001:db8::1"])),
            ip("2001:db8::1")
        );
        // Nothing forwarded, or garbage: the proxy itself is all that is known.
        assert_eq!(client("10.0.0.2", &HeaderMap::new()), ip("10.0.0.2"));
        assert_eq!(client("10.0.0.2", &forwarded(&["unknown"])), ip("10.0.0.2"));
        assert_eq!(
            client("10.0.0.2", &forwarded(&["unknown, 198.51.100.1"])),
            ip("198.51.100.1"),
            "what the client wrote is not even read"
        );
        // Only proxies on the way: the farthest one.
        assert_eq!(
            client("10.0.0.2", &forwarded(&["10.0.0.5"])),
            ip("10.0.0.5")
        );
    }

    #[test]
    fn a_contact_gets_at_most_three_confirmations_an_hour() {
        let (limits, start) = (Limits::default(), Instant::now());
        for _ in 0..PER_CONTACT {
            assert!(limits.allow("192.0.2.1", &ann(), start));
        }
        assert!(!limits.allow("192.0.2.2", &ann(), start), "from anywhere");
        assert!(limits.allow("192.0.2.1", &ann(), start + LIMIT_WINDOW));
    }

    #[test]
    fn a_client_asks_for_at_most_twenty_confirmations_an_hour() {
        let (limits, now) = (Limits::default(), Instant::now());
        for n in 0..PER_CLIENT {
            let contact = Contact::parse(&format!("c{n}@example.com")).unwrap();
            assert!(limits.allow("192.0.2.1", &contact, now));
        }
        assert!(!limits.allow("192.0.2.1", &ann(), now));
        assert!(limits.allow("192.0.2.9", &ann(), now), "another client");
    }

    #[test]
    fn the_csrf_cookie_is_read_among_others_and_compared_whole() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("theme=dark; crier_csrf=abc.def; other=1"),
        );
        assert_eq!(cookie(&headers, CSRF_COOKIE), Some("abc.def"));
        assert!(super::super::same_secret(b"abc.def", b"abc.def"));
        assert!(!super::super::same_secret(b"abc.def", b"abc.deg"));
        assert!(!super::super::same_secret(b"abc.def", b"abc.de"));
    }
}
