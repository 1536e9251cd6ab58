//! The Bluesky channel: one post per update, each later update of an incident a reply in the
//! thread its first post started, so an incident reads as one thread. It owns its settings (the
//! service, the handle and its app password, the language), one session for every post it
//! makes (a login is limited to 30 in 5 minutes, so it logs in once and refreshes), and
//! Bluesky's limits: 300 graphemes and 3,000 bytes. Links are marked as facets at their UTF-8
//! byte offsets, and each post's record key comes from its delivery key, so a retry finds a
//! post an earlier attempt made after all instead of posting it twice.

use super::http::{
    LONGEST_RETRY_AFTER, api_base, client, endpoint, failure_for_request, failure_for_response,
    provider_text, read_capped, redact_url,
};
use super::limits::{Measure, Overflow, fit};
use super::registry::{ChannelKind, ChannelSettings, SettingsInput};
use super::{Attempt, BuildContext, Channel, PartFormat, Reach, Rejection, RenderedPart};
use crate::config::{self, ConfigError, DeliveryPolicy, Rate};
use crate::delivery::{DeliveryError, DeliveryKey, FailureKind, Receipt, RemoteThread};
use crate::render::{MessageContext, Renderer};
use base64::Engine;
use chrono::{DateTime, Utc};
use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use unicode_segmentation::UnicodeSegmentation;

pub static KIND: ChannelKind = ChannelKind {
    name: "bluesky",
    templates: &[TEMPLATE],
    // One at a time: each post replies to the incident's latest, so two in flight would both
    // answer the same one and fork the thread. 60 attempts a minute stays far inside what a
    // Bluesky PDS allows an account (3,000 requests in 5 minutes; 5,000 points an hour at 3 a
    // post), with room for the login, a refresh and a look-up around a post.
    default_policy: DeliveryPolicy::with_concurrency(1)
        .with_timeout(Duration::from_secs(15))
        .with_rate(Rate::new(60, Duration::from_secs(60))),
    parse: BlueskySettings::parse,
};

const TEMPLATE: &str = "bluesky.txt";

/// Bluesky's own service, where most accounts live (it sends each request on to the account's
/// PDS).
const DEFAULT_SERVICE: &str = "https://bsky.social";

/// `app.bsky.feed.post`'s `maxGraphemes`.
pub const MAX_GRAPHEMES: usize = 300;

/// `app.bsky.feed.post`'s `maxLength`, in bytes of UTF-8.
pub const MAX_BYTES: usize = 3000;

/// The collection posts are records of.
const POSTS: &str = "app.bsky.feed.post";

/// How long before its `exp` an access token is refreshed: a post sent a moment before the
/// token expires could arrive after it.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// The most of the service's answer that is read: a session or a record is a few kilobytes.
const ANSWER_LIMIT: usize = 1024 * 1024;

/// The alphabet of a TID ("base32-sortable"): sorted, so TIDs sort as the numbers they encode.
const TID_ALPHABET: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";

/// A channel file of kind `bluesky`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlueskyFile {
    /// The account's PDS, like `https://bsky.social` (the default).
    service: Option<String>,
    /// The account's handle, like `status.example.com`, or its DID.
    handle: String,
    /// The environment variable holding an app password of the account.
    app_password_env: String,
    /// The posts' language, as a BCP 47 tag like `en` or `pt-BR`.
    language: Option<String>,
    /// What to do with a text over Bluesky's limits: `refuse` (the default) or `truncate`.
    #[serde(default)]
    overflow: Overflow,
}

#[derive(Clone)]
pub struct BlueskySettings {
    /// The service's base URL, without a trailing slash in its path.
    pub service: Url,
    /// A handle (lower-case) or a DID: what `createSession` calls the identifier.
    pub handle: String,
    pub app_password: SecretString,
    pub language: Option<String>,
    pub overflow: Overflow,
}

impl std::fmt::Debug for BlueskySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlueskySettings")
            .field("service", &redact_url(&self.service))
            .field("handle", &self.handle)
            .field("language", &self.language)
            .field("overflow", &self.overflow)
            .finish_non_exhaustive()
    }
}

impl BlueskySettings {
    fn parse(input: &SettingsInput) -> Result<Arc<dyn ChannelSettings>, ConfigError> {
        let file = input.file;
        let raw: BlueskyFile = input.parse()?;
        let service = api_base(raw.service.as_deref().unwrap_or(DEFAULT_SERVICE))
            .map_err(|reason| ConfigError::at(file, "service", reason))?;
        let handle = identifier(&raw.handle).ok_or_else(|| {
            ConfigError::at(
                file,
                "handle",
                format!(
                    "'{}' is not a handle (like status.example.com) or a DID (like did:plc:…)",
                    raw.handle.trim()
                ),
            )
        })?;
        let language = raw
            .language
            .map(|tag| {
                language_tag(&tag).ok_or_else(|| {
                    ConfigError::at(
                        file,
                        "language",
                        format!("'{tag}' is not a language tag like en or pt-BR"),
                    )
                })
            })
            .transpose()?;
        let app_password = config::secret(
            file,
            "app_password_env",
            &raw.app_password_env,
            input.secrets,
        )?;
        // The account's own password can do anything the account can (delete it, change its
        // handle); an app password can only post, and can be revoked alone.
        if !is_app_password(app_password.expose_secret()) {
            return Err(ConfigError::at(
                file,
                "app_password_env",
                format!(
                    "{} does not hold an app password (four groups of four letters or digits, like abcd-efgh-ijkl-mnop): \
                     create one in Bluesky's Settings > Privacy and security > App passwords",
                    raw.app_password_env
                ),
            ));
        }
        Ok(Arc::new(BlueskySettings {
            service,
            handle,
            app_password,
            language,
            overflow: raw.overflow,
        }))
    }
}

/// A handle (a domain name, lower-cased, without the `@` people write before it) or a DID.
fn identifier(text: &str) -> Option<String> {
    let text = text.trim();
    if text.starts_with("did:") {
        return is_did(text).then(|| text.to_owned());
    }
    let handle = text.strip_prefix('@').unwrap_or(text).to_ascii_lowercase();
    let labels: Vec<&str> = handle.split('.').collect();
    let label_ok = |label: &&str| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    let valid = handle.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(label_ok)
        && labels
            .last()
            .is_some_and(|tld| tld.starts_with(|c: char| c.is_ascii_lowercase()));
    valid.then_some(handle)
}

/// `did:method:id`, in the characters the DID syntax allows: none that a URL's query would
/// have to escape.
fn is_did(text: &str) -> bool {
    let Some((method, id)) = text
        .strip_prefix("did:")
        .and_then(|rest| rest.split_once(':'))
    else {
        return false;
    };
    !method.is_empty()
        && method.bytes().all(|b| b.is_ascii_lowercase())
        && !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'%' | b'-'))
}

/// A BCP 47 tag as Bluesky's `langs` takes it: a primary language of 2 or 3 letters
/// (lower-cased), then subtags of letters and digits (`pt-BR`, `zh-Hant`).
fn language_tag(text: &str) -> Option<String> {
    let text = text.trim();
    let mut subtags = text.split('-');
    let primary = subtags.next()?;
    if !(2..=3).contains(&primary.len()) || !primary.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    let mut tag = primary.to_ascii_lowercase();
    for subtag in subtags {
        if !(1..=8).contains(&subtag.len()) || !subtag.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return None;
        }
        tag.push('-');
        tag.push_str(subtag);
    }
    Some(tag)
}

/// The form a PDS gives app passwords: `xxxx-xxxx-xxxx-xxxx`.
fn is_app_password(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 4
        && groups
            .iter()
            .all(|group| group.len() == 4 && group.bytes().all(|b| b.is_ascii_alphanumeric()))
}

#[async_trait::async_trait]
impl ChannelSettings for BlueskySettings {
    async fn build(
        &self,
        _id: &str,
        policy: &DeliveryPolicy,
        context: &BuildContext,
    ) -> crate::Result<Arc<dyn Channel>> {
        // No login here: every command that opens the store builds its channels, and a
        // preview or a `deliveries` must not spend one of the account's logins.
        Ok(Arc::new(BlueskyChannel {
            create_session: endpoint(&self.service, "/xrpc/com.atproto.server.createSession"),
            refresh_session: endpoint(&self.service, "/xrpc/com.atproto.server.refreshSession"),
            create_record: endpoint(&self.service, "/xrpc/com.atproto.repo.createRecord"),
            get_record: endpoint(&self.service, "/xrpc/com.atproto.repo.getRecord"),
            handle: self.handle.clone(),
            app_password: self.app_password.clone(),
            language: self.language.clone(),
            overflow: self.overflow,
            renderer: context.renderer.clone(),
            client: client(policy.timeout)?,
            session: Mutex::new(SessionState::LoggedOut),
        }))
    }
}

// ---- the text ---------------------------------------------------------------------------------

/// Bluesky's limits on a post's text, as one measure in graphemes: a text over 3,000 bytes
/// measures as over 300 graphemes too, so the one cut [`fit`] makes keeps within both.
struct PostLimits;

fn graphemes(text: &str) -> usize {
    text.graphemes(true).count()
}

impl Measure for PostLimits {
    fn measure(&self, text: &str) -> usize {
        let count = graphemes(text);
        if text.len() > MAX_BYTES {
            count.max(MAX_GRAPHEMES + 1)
        } else {
            count
        }
    }

    fn limit(&self) -> usize {
        MAX_GRAPHEMES
    }

    fn unit(&self) -> &str {
        "graphemes"
    }
}

/// The byte ranges of every http(s) URL in `text`: in a word, after an opening bracket or
/// quote, without the punctuation that ends a sentence (or a closing bracket the URL did not
/// open), and only if it parses as a URL with a host.
pub fn links(text: &str) -> Vec<Range<usize>> {
    words(text)
        .into_iter()
        .filter_map(|word| {
            let within = &text[word.clone()];
            let opened = within.len() - within.trim_start_matches(['(', '[', '<', '"', '\'']).len();
            let candidate = &within[opened..];
            if !(candidate.starts_with("https://") || candidate.starts_with("http://")) {
                return None;
            }
            let url = trim_trailing_punctuation(candidate);
            let parsed = Url::parse(url).ok()?;
            parsed.host_str().filter(|host| !host.is_empty())?;
            let start = word.start + opened;
            Some(start..start + url.len())
        })
        .collect()
}

/// The byte ranges of the whitespace-separated words of `text`.
fn words(text: &str) -> Vec<Range<usize>> {
    let mut words = Vec::new();
    let mut start = None;
    for (at, c) in text.char_indices() {
        if c.is_whitespace() {
            if let Some(from) = start.take() {
                words.push(from..at);
            }
        } else if start.is_none() {
            start = Some(at);
        }
    }
    if let Some(from) = start {
        words.push(from..text.len());
    }
    words
}

fn trim_trailing_punctuation(url: &str) -> &str {
    let mut url = url;
    loop {
        let trimmed = url.trim_end_matches(['.', ',', ';', ':', '!', '?', '"', '\'', '>']);
        let trimmed = match trimmed.chars().next_back() {
            Some(')') if !trimmed.contains('(') => &trimmed[..trimmed.len() - 1],
            Some(']') if !trimmed.contains('[') => &trimmed[..trimmed.len() - 1],
            _ => trimmed,
        };
        if trimmed.len() == url.len() {
            return url;
        }
        url = trimmed;
    }
}

/// A link facet: a URL's byte range in the text and where it points.
#[derive(Debug, Serialize)]
struct Facet {
    index: ByteSlice,
    features: [LinkFeature; 1],
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ByteSlice {
    byte_start: usize,
    byte_end: usize,
}

#[derive(Debug, Serialize)]
struct LinkFeature {
    #[serde(rename = "$type")]
    kind: &'static str,
    uri: String,
}

fn facets(text: &str) -> Vec<Facet> {
    links(text)
        .into_iter()
        .map(|range| {
            let written = &text[range.clone()];
            // The link goes where a browser would: to the URL in its one ASCII form (an
            // internationalised domain in punycode, a path percent-encoded).
            let uri = Url::parse(written).map_or_else(|_| written.to_owned(), String::from);
            Facet {
                features: [LinkFeature {
                    kind: "app.bsky.richtext.facet#link",
                    uri,
                }],
                index: ByteSlice {
                    byte_start: range.start,
                    byte_end: range.end,
                },
            }
        })
        .collect()
}

// ---- record keys and threads ------------------------------------------------------------------

/// The record key of a delivery's post: a TID (13 characters of base32-sortable encoding a
/// 64-bit number whose top bit is 0, then 53 bits of microseconds since 1970, then a 10-bit
/// clock id) that every attempt at the delivery computes alike, so a retry writes the same
/// record, which the service will not make twice, and can look it up.
///
/// The microseconds are when the update was created (so the account's posts sort as their
/// updates do, and the key's time is a real one a relay accepts), and the clock id is the first
/// 10 bits of the SHA-256 of the delivery key, which tells apart the posts of one update on two
/// channels.
pub fn record_key(key: &DeliveryKey, created_at: DateTime<Utc>) -> String {
    let digest = Sha256::digest(key.as_str().as_bytes());
    let clock_id = (u64::from(digest[0]) << 2) | (u64::from(digest[1]) >> 6);
    let micros = u64::try_from(created_at.timestamp_micros()).unwrap_or(0) & ((1 << 53) - 1);
    let value = (micros << 10) | clock_id;
    (0..13)
        .map(|position| {
            let digit = (value >> (60 - 5 * position)) & 31;
            char::from(TID_ALPHABET[digit as usize])
        })
        .collect()
}

/// A post, as a reply names it: its `at://` URI and the CID of its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostRef {
    pub uri: String,
    pub cid: String,
}

impl PostRef {
    fn is_complete(&self) -> bool {
        self.uri.starts_with("at://") && !self.cid.is_empty()
    }
}

/// An incident's thread on this channel, kept on the incident: its first post (the root every
/// reply names) and its latest (the parent the next one answers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadRefs {
    pub root: PostRef,
    pub parent: PostRef,
}

/// The thread an earlier update of the incident started, from what the dispatcher kept.
fn thread_of(thread: Option<&RemoteThread>) -> Result<Option<ThreadRefs>, DeliveryError> {
    let Some(thread) = thread else {
        return Ok(None);
    };
    serde_json::from_value::<ThreadRefs>(thread.clone())
        .ok()
        .filter(|refs| refs.root.is_complete() && refs.parent.is_complete())
        .map(Some)
        .ok_or_else(|| {
            DeliveryError::permanent(format!(
                "the incident's thread on this channel is not a Bluesky post ({thread})"
            ))
        })
}

/// What a post's delivery gives back: its URI, and the thread with it as the latest post.
fn receipt(post: PostRef, thread: Option<ThreadRefs>) -> Receipt {
    let root = thread.map_or_else(|| post.clone(), |thread| thread.root);
    let provider_id = Some(post.uri.clone());
    let thread = ThreadRefs { root, parent: post };
    Receipt {
        provider_id,
        thread: serde_json::to_value(thread).ok(),
    }
}

// ---- the session ------------------------------------------------------------------------------

/// A session with the service, as `createSession` and `refreshSession` give it.
#[derive(Clone)]
struct Session {
    /// `Bearer <accessJwt>`, marked sensitive.
    access: HeaderValue,
    /// `Bearer <refreshJwt>`, marked sensitive.
    refresh: HeaderValue,
    /// The account's DID: the repository posts are written to.
    did: String,
    /// When to refresh ahead of the access token's expiry; `None` when the token does not say.
    refresh_at: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SessionAnswer {
    access_jwt: String,
    refresh_jwt: String,
    did: String,
}

impl Session {
    /// The session in a `createSession` or `refreshSession` answer.
    fn read(body: &[u8]) -> Result<Self, DeliveryError> {
        let answer: SessionAnswer = serde_json::from_slice(body).map_err(|_| {
            DeliveryError::permanent(
                "the service's answer holds no session (accessJwt, refreshJwt, did)",
            )
        })?;
        if !is_did(&answer.did) {
            return Err(DeliveryError::permanent(
                "the service's session names no DID for the account",
            ));
        }
        let access = bearer(&answer.access_jwt);
        let refresh = bearer(&answer.refresh_jwt);
        let (Some(access), Some(refresh)) = (access, refresh) else {
            return Err(DeliveryError::permanent(
                "the service's session tokens cannot be sent in a header",
            ));
        };
        let margin = chrono::TimeDelta::from_std(REFRESH_MARGIN).unwrap_or_default();
        let refresh_at =
            jwt_expiry(&answer.access_jwt).and_then(|exp| exp.checked_sub_signed(margin));
        Ok(Self {
            access,
            refresh,
            did: answer.did,
            refresh_at,
        })
    }

    fn is_due_for_refresh(&self, now: DateTime<Utc>) -> bool {
        self.refresh_at.is_some_and(|at| now >= at)
    }
}

/// `Bearer <token>` as a header, marked sensitive so it never prints.
fn bearer(token: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// When a JWT says it expires (its `exp` claim), read without checking its signature: crier
/// only needs to know when to refresh it, and the service checks it anyway.
fn jwt_expiry(token: &str) -> Option<DateTime<Utc>> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    if !exp.is_finite() {
        return None;
    }
    // Saturates for absurd values, which `from_timestamp` then refuses.
    DateTime::from_timestamp(exp as i64, 0)
}

/// The session kept for every post.
enum SessionState {
    LoggedOut,
    Active(Session),
    /// The service refused the login or a refresh for good (or answered with nothing usable):
    /// logging in again with the same password would only count against the account's login
    /// limit. A restart (with a new password) asks again.
    Refused(DeliveryError),
}

/// Whether a refused call failed because its access token expired (sooner than its `exp`
/// said, or the token did not say).
fn is_expired_token(failure: &DeliveryError) -> bool {
    matches!(failure.status, Some(400 | 401)) && failure.code.as_deref() == Some("ExpiredToken")
}

/// Whether a failed `refreshSession` says the refresh token is no good any more (expired after
/// about two months, or spent by a refresh whose answer was lost): then only a login helps.
fn is_spent_refresh(failure: &DeliveryError) -> bool {
    failure.status == Some(401)
        || (failure.status == Some(400)
            && matches!(
                failure.code.as_deref(),
                Some("ExpiredToken" | "InvalidToken")
            ))
}

/// The wait Bluesky's `RateLimit-Reset` asks for (Unix seconds; no `X-`, so the shared
/// helper does not see it), on a 429 or when `RateLimit-Remaining` says nothing is left.
fn rate_limit_wait(
    status: StatusCode,
    remaining: Option<&str>,
    reset: Option<&str>,
    now: DateTime<Utc>,
) -> Option<Duration> {
    let exhausted = status == StatusCode::TOO_MANY_REQUESTS
        || remaining.and_then(|text| text.trim().parse::<u64>().ok()) == Some(0);
    if !exhausted {
        return None;
    }
    let at = DateTime::from_timestamp(reset?.trim().parse().ok()?, 0)?;
    Some(crate::clock::until(now, at).min(LONGEST_RETRY_AFTER))
}

/// The XRPC error answer: `{"error": "ExpiredToken", "message": "Token has expired"}`.
#[derive(Deserialize)]
struct XrpcError {
    error: Option<String>,
    message: Option<String>,
}

// ---- the channel ------------------------------------------------------------------------------

pub struct BlueskyChannel {
    create_session: Url,
    refresh_session: Url,
    create_record: Url,
    get_record: Url,
    handle: String,
    app_password: SecretString,
    language: Option<String>,
    overflow: Overflow,
    renderer: Arc<Renderer>,
    client: reqwest::Client,
    /// Held while logging in or refreshing, so concurrent attempts wait for the one session
    /// instead of each logging in.
    session: Mutex<SessionState>,
}

/// `com.atproto.repo.createRecord`, as JSON.
#[derive(Serialize)]
struct NewRecord<'a> {
    repo: &'a str,
    collection: &'static str,
    rkey: &'a str,
    record: PostRecord<'a>,
}

/// An `app.bsky.feed.post` record.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PostRecord<'a> {
    #[serde(rename = "$type")]
    kind: &'static str,
    text: &'a str,
    created_at: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    langs: Option<[&'a str; 1]>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    facets: Vec<Facet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply: Option<&'a ThreadRefs>,
}

impl BlueskyChannel {
    /// The post's text, within Bluesky's limits (or cut to them, if the file says so).
    fn text(&self, message: &MessageContext) -> Result<String, Rejection> {
        let rendered = self.renderer.render(TEMPLATE, message)?;
        let text = rendered.trim();
        if text.is_empty() {
            return Err(Rejection::Invalid("the post renders empty".into()));
        }
        if self.overflow == Overflow::Refuse
            && text.len() > MAX_BYTES
            && graphemes(text) <= MAX_GRAPHEMES
        {
            return Err(Rejection::OverLimit(format!(
                "the text is {} bytes; the limit is {MAX_BYTES} bytes",
                text.len()
            )));
        }
        fit(text, self.overflow, &message.links.status_page, &PostLimits)
    }

    /// Sends one XRPC request: its answer if it succeeded, else the failure, with the XRPC
    /// error's name as its code and its message in its reason.
    async fn call(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, DeliveryError> {
        let response = request.send().await.map_err(|e| failure_for_request(&e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(Self::refused(response).await)
    }

    async fn refused(response: reqwest::Response) -> DeliveryError {
        let mut failure = failure_for_response(&response, "the service");
        if failure.retry_after.is_none() {
            let header = |name: &str| response.headers().get(name)?.to_str().ok();
            let wait = rate_limit_wait(
                response.status(),
                header("ratelimit-remaining"),
                header("ratelimit-reset"),
                Utc::now(),
            );
            failure = failure.with_retry_after(wait);
        }
        let said = read_capped(response, ANSWER_LIMIT)
            .await
            .ok()
            .and_then(|body| serde_json::from_slice::<XrpcError>(&body).ok());
        let Some(said) = said else {
            return failure;
        };
        let name = said
            .error
            .as_deref()
            .map(provider_text)
            .filter(|name| !name.is_empty());
        let text = said
            .message
            .as_deref()
            .map(provider_text)
            .filter(|text| !text.is_empty())
            .or_else(|| name.clone());
        if let Some(text) = text {
            let reason = format!("{}: {text}", failure.reason);
            failure = failure.with_reason(reason);
        }
        match name {
            Some(name) => failure.with_code(name),
            None => failure,
        }
    }

    /// The session to post with: the one kept, refreshed first when its access token is about
    /// to expire, or a login when there is none.
    async fn session(&self) -> Result<Session, DeliveryError> {
        let mut state = self.session.lock().await;
        let kept = match &*state {
            SessionState::Refused(failure) => return Err(failure.clone()),
            SessionState::Active(session) if !session.is_due_for_refresh(Utc::now()) => {
                return Ok(session.clone());
            }
            SessionState::Active(session) => Some(session.clone()),
            SessionState::LoggedOut => None,
        };
        let renewed = match kept {
            Some(expiring) => self.refresh_or_login(&expiring).await,
            None => self.login().await,
        };
        keep(&mut state, renewed)
    }

    /// A new session after the service said `used`'s access token expired, unless another
    /// attempt renewed it meanwhile.
    async fn renew(&self, used: &Session) -> Result<Session, DeliveryError> {
        let mut state = self.session.lock().await;
        match &*state {
            SessionState::Refused(failure) => return Err(failure.clone()),
            SessionState::Active(current) if current.access != used.access => {
                return Ok(current.clone());
            }
            _ => {}
        }
        let renewed = self.refresh_or_login(used).await;
        keep(&mut state, renewed)
    }

    /// `createSession` with the handle and the app password. A token already due for a
    /// refresh when it arrives is refreshed at once; if that fails, or the refreshed one is
    /// due too, it is taken as the service gives it (this machine's clock may be the one that
    /// is wrong), and an `ExpiredToken` answer will say when it really expires.
    async fn login(&self) -> Result<Session, DeliveryError> {
        let credentials = serde_json::json!({
            "identifier": self.handle,
            "password": self.app_password.expose_secret(),
        });
        let request = self
            .client
            .post(self.create_session.clone())
            .json(&credentials);
        let session = self
            .read_session(request)
            .await
            .map_err(|failure| self.while_logging_in(failure))?;
        if !session.is_due_for_refresh(Utc::now()) {
            return Ok(session);
        }
        match self.refresh(&session).await {
            Ok(refreshed) => Ok(refreshed),
            Err(failure) => {
                tracing::warn!(handle = %self.handle, reason = %failure.reason, "the new session looks expired and cannot be refreshed; using it as it is");
                Ok(Session {
                    refresh_at: None,
                    ..session
                })
            }
        }
    }

    fn while_logging_in(&self, failure: DeliveryError) -> DeliveryError {
        let reason = format!("logging in as {}: {}", self.handle, failure.reason);
        failure.with_reason(reason)
    }

    /// `refreshSession` with the refresh token: a new access token (and a new refresh token,
    /// since each is good for one refresh).
    async fn refresh(&self, session: &Session) -> Result<Session, DeliveryError> {
        let request = self
            .client
            .post(self.refresh_session.clone())
            .header(AUTHORIZATION, session.refresh.clone());
        let mut refreshed = self.read_session(request).await.map_err(|failure| {
            let reason = format!("refreshing the session: {}", failure.reason);
            failure.with_reason(reason)
        })?;
        if refreshed.is_due_for_refresh(Utc::now()) {
            // Expired already by this machine's clock: it is the clock that is wrong, and the
            // service will say when the token really expires.
            refreshed.refresh_at = None;
        }
        Ok(refreshed)
    }

    /// A refresh, or a login when the refresh token is no good any more.
    async fn refresh_or_login(&self, expiring: &Session) -> Result<Session, DeliveryError> {
        match self.refresh(expiring).await {
            Err(failure) if is_spent_refresh(&failure) => {
                tracing::warn!(handle = %self.handle, reason = %failure.reason, "the session cannot be refreshed; logging in again");
                self.login().await
            }
            other => other,
        }
    }

    /// The session a `createSession` or `refreshSession` request answers with.
    async fn read_session(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<Session, DeliveryError> {
        let response = self.call(request).await?;
        let body = read_capped(response, ANSWER_LIMIT)
            .await
            .map_err(|e| failure_for_request(&e))?;
        Session::read(&body)
    }

    /// Sends a request that needs the session, made by `request` from it; if the service says
    /// the access token expired, renews the session once and sends it again.
    async fn authorized(
        &self,
        session: &mut Session,
        request: impl Fn(&Session) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, DeliveryError> {
        match self.call(request(session)).await {
            Err(failure) if is_expired_token(&failure) => {
                *session = self.renew(session).await?;
                self.call(request(session)).await
            }
            answered => answered,
        }
    }

    /// The post under `rkey`, if an earlier attempt made it after all (its answer lost to a
    /// timeout or a 5xx).
    async fn existing_post(
        &self,
        session: &mut Session,
        rkey: &str,
    ) -> Result<Option<PostRef>, DeliveryError> {
        let lookup = |session: &Session| {
            let mut url = self.get_record.clone();
            // The DID was checked to hold only characters a query may carry as they are.
            url.set_query(Some(&format!(
                "repo={}&collection={POSTS}&rkey={rkey}",
                session.did
            )));
            self.client
                .get(url)
                .header(AUTHORIZATION, session.access.clone())
        };
        let response = match self.authorized(session, lookup).await {
            Ok(response) => response,
            Err(failure)
                if failure.status == Some(404)
                    || (failure.status == Some(400)
                        && failure.code.as_deref() == Some("RecordNotFound")) =>
            {
                return Ok(None);
            }
            Err(failure) => {
                let reason = format!(
                    "cannot tell whether an earlier attempt posted: {}",
                    failure.reason
                );
                return Err(failure.with_reason(reason));
            }
        };
        let found = read_capped(response, ANSWER_LIMIT)
            .await
            .ok()
            .and_then(|body| serde_json::from_slice::<PostRef>(&body).ok())
            .filter(PostRef::is_complete);
        match found {
            Some(post) => Ok(Some(post)),
            None => Err(DeliveryError::transient(
                "the service found the post an earlier attempt made, but gave no uri and cid",
            )),
        }
    }
}

/// Keeps the outcome of a login or a refresh: the new session, or a refusal that asking again
/// would not change. A transient failure keeps what was there, to try again next time.
fn keep(
    state: &mut SessionState,
    renewed: Result<Session, DeliveryError>,
) -> Result<Session, DeliveryError> {
    match renewed {
        Ok(session) => {
            *state = SessionState::Active(session.clone());
            Ok(session)
        }
        Err(failure) => {
            if !matches!(
                failure.kind,
                FailureKind::Transient | FailureKind::Throttled
            ) {
                *state = SessionState::Refused(failure.clone());
            }
            Err(failure)
        }
    }
}

#[async_trait::async_trait]
impl Channel for BlueskyChannel {
    fn reach(&self) -> Reach {
        Reach::Broadcast {
            accepts_targeted: false,
        }
    }

    fn render(&self, message: &MessageContext) -> Result<Vec<RenderedPart>, Rejection> {
        let text = self.text(message)?;
        let length = RenderedPart {
            part: "length".into(),
            text: format!(
                "{} of {MAX_GRAPHEMES} graphemes, {} of {MAX_BYTES} bytes",
                graphemes(&text),
                text.len()
            ),
            format: PartFormat::Measure,
        };
        Ok(vec![
            RenderedPart {
                part: "text".into(),
                text,
                format: PartFormat::Text,
            },
            length,
        ])
    }

    async fn deliver(
        &self,
        message: &MessageContext,
        attempt: &Attempt<'_>,
    ) -> Result<Receipt, DeliveryError> {
        let text = self
            .text(message)
            .map_err(|e| DeliveryError::permanent(e.to_string()))?;
        let thread = thread_of(attempt.thread)?;
        let rkey = record_key(attempt.key, message.source.update.created_at);
        let mut session = self.session().await?;
        // An earlier attempt that ended in a 5xx or without an answer may have posted: look
        // first. A 429 does not count as an attempt, so a throttled post is not looked up.
        if attempt.number > 1
            && let Some(post) = self.existing_post(&mut session, &rkey).await?
        {
            return Ok(receipt(post, thread));
        }
        let record = |session: &Session| {
            let new = NewRecord {
                repo: &session.did,
                collection: POSTS,
                rkey: &rkey,
                record: PostRecord {
                    kind: POSTS,
                    text: &text,
                    created_at: &message.update.created_at,
                    langs: self.language.as_deref().map(|language| [language]),
                    facets: facets(&text),
                    reply: thread.as_ref(),
                },
            };
            self.client
                .post(self.create_record.clone())
                .header(AUTHORIZATION, session.access.clone())
                .json(&new)
        };
        let response = self.authorized(&mut session, record).await?;
        // The post is made: whatever the body holds, this attempt succeeded. Without its CID
        // no reply can name it, so the next update replies to the one before instead.
        let created = read_capped(response, ANSWER_LIMIT)
            .await
            .ok()
            .and_then(|body| serde_json::from_slice::<PostRef>(&body).ok())
            .filter(PostRef::is_complete);
        match created {
            Some(post) => Ok(receipt(post, thread)),
            None => {
                tracing::warn!(delivery = %attempt.key, "the service made the post but gave no uri and cid");
                Ok(Receipt {
                    provider_id: Some(format!("at://{}/{POSTS}/{rkey}", session.did)),
                    thread: None,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::Recipient;

    struct Env(&'static str);

    impl crate::config::SecretSource for Env {
        fn get(&self, _: &str) -> Option<String> {
            Some(self.0.to_owned())
        }
    }

    /// The settings as `Debug` shows them, or the error.
    fn parse_with(table: &str, password: &'static str) -> Result<String, String> {
        let table: toml::Value = toml::from_str(table).unwrap();
        let settings = BlueskySettings::parse(&SettingsInput {
            file: std::path::Path::new("channels/bluesky.toml"),
            base: std::path::Path::new("."),
            table,
            secrets: &Env(password),
        })
        .map_err(|e| e.to_string())?;
        Ok(format!("{settings:?}"))
    }

    fn parse(table: &str) -> Result<(), String> {
        parse_with(table, "abcd-efgh-ijkl-mnop").map(|_| ())
    }

    const MINIMAL: &str = "handle = \"status.example.com\"\napp_password_env = \"P\"\n";

    fn jwt(claims: serde_json::Value) -> String {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.{}",
            engine.encode(br#"{"typ":"at+jwt","alg":"ES256K"}"#),
            engine.encode(claims.to_string()),
            engine.encode(b"signature")
        )
    }

    #[test]
    fn settings_are_checked_with_their_key() {
        let shown = parse_with(MINIMAL, "abcd-efgh-ijkl-mnop").unwrap();
        assert!(
            shown.contains("https://bsky.social/"),
            "the default service: {shown}"
        );
        assert!(!shown.contains("abcd-efgh"), "{shown}");
        assert!(parse("handle = \"@Status.Example.com\"\napp_password_env = \"P\"\n").is_ok());
        assert!(
            parse("handle = \"did:plc:ewvi7nxzyoun6zhxrhs64oiz\"\napp_password_env = \"P\"\n")
                .is_ok()
        );
        let error = parse("handle = \"status example\"\napp_password_env = \"P\"\n").unwrap_err();
        assert!(error.contains("handle"), "{error}");
        let error = parse(&format!("{MINIMAL}language = \"english\"\n")).unwrap_err();
        assert!(error.contains("language"), "{error}");
        assert!(parse(&format!("{MINIMAL}language = \"pt-BR\"\n")).is_ok());
        let error = parse(&format!("{MINIMAL}service = \"bsky.social\"\n")).unwrap_err();
        assert!(error.contains("service"), "{error}");
        let error = parse(&format!("{MINIMAL}visibility = \"public\"\n")).unwrap_err();
        assert!(error.contains("visibility"), "{error}");
    }

    #[test]
    fn the_accounts_own_password_is_refused_without_showing_it() {
        let error = parse_with(MINIMAL, "hunter2-my-real-password").unwrap_err();
        assert!(error.contains("app_password_env"), "{error}");
        assert!(error.contains("app password"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn the_identifier_is_a_lower_case_handle_or_a_did() {
        assert_eq!(
            identifier(" @Status.Example.COM ").as_deref(),
            Some("status.example.com")
        );
        assert_eq!(
            identifier("did:web:status.example.com").as_deref(),
            Some("did:web:status.example.com")
        );
        for bad in [
            "",
            "status",
            "-a.example.com",
            "a.123",
            "did:plc:",
            "did:x y:z",
            "a b.com",
        ] {
            assert_eq!(identifier(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_record_key_is_a_tid_the_same_for_every_attempt_and_sorted_by_the_update_time() {
        let update = ulid::Ulid::new();
        let key = DeliveryKey::new(update, "social", &Recipient::Broadcast);
        let created = DateTime::parse_from_rfc3339("2026-11-24T15:04:05.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let rkey = record_key(&key, created);
        assert_eq!(rkey.len(), 13);
        assert!(rkey.bytes().all(|b| TID_ALPHABET.contains(&b)), "{rkey}");
        assert!("234567abcdefghij".contains(&rkey[..1]), "top bit 0: {rkey}");
        assert_eq!(record_key(&key, created), rkey, "deterministic");
        let other = DeliveryKey::new(update, "bsky-2", &Recipient::Broadcast);
        assert_ne!(record_key(&other, created), rkey);
        let later = created + chrono::TimeDelta::microseconds(1);
        assert!(record_key(&key, later) > rkey);

        // Decoded, it holds the microseconds and 10 bits of clock id.
        let value = rkey.bytes().fold(0u64, |value, b| {
            let digit = TID_ALPHABET.iter().position(|&a| a == b).unwrap() as u64;
            (value << 5) | digit
        });
        assert_eq!(value >> 10, created.timestamp_micros() as u64);
    }

    #[test]
    fn links_are_found_at_their_utf8_byte_offsets() {
        let text = "Café ☕ 🚀 voir https://help.example.com/a?b=1. (https://x.example/y) \
                    xhttps://no.example ftp://no.example/ http://";
        let found: Vec<&str> = links(text).into_iter().map(|r| &text[r]).collect();
        assert_eq!(
            found,
            ["https://help.example.com/a?b=1", "https://x.example/y"]
        );
        let first = &links(text)[0];
        assert_eq!(first.start, text.find("https://").unwrap());
        assert_eq!(
            first.start,
            "Café ☕ 🚀 voir ".len(),
            "bytes: é is 2, ☕ 3, 🚀 4"
        );
        assert_ne!(first.start, "Café ☕ 🚀 voir ".chars().count());
        let wiki = "See https://en.example.org/wiki/Thing_(band).";
        let found: Vec<&str> = links(wiki).into_iter().map(|r| &wiki[r]).collect();
        assert_eq!(found, ["https://en.example.org/wiki/Thing_(band)"]);
    }

    #[test]
    fn the_limit_counts_graphemes_and_bytes_and_either_is_over() {
        let thumbs = "👍🏽".repeat(300);
        assert_eq!(graphemes(&thumbs), 300);
        assert!(PostLimits.measure(&thumbs) <= MAX_GRAPHEMES);
        assert_eq!(PostLimits.measure(&"👍🏽".repeat(301)), 301);
        let families = "👨‍👩‍👧‍👦".repeat(130);
        assert_eq!(graphemes(&families), 130);
        assert!(families.len() > MAX_BYTES);
        assert!(PostLimits.measure(&families) > MAX_GRAPHEMES);
        let cut = fit(
            &format!("{} {}", "word".repeat(2), "👨‍👩‍👧‍👦 ".repeat(200)),
            Overflow::Truncate,
            "https://status.example.com/",
            &PostLimits,
        )
        .unwrap();
        assert!(cut.len() <= MAX_BYTES && graphemes(&cut) <= MAX_GRAPHEMES);
        assert!(cut.ends_with("… https://status.example.com/"), "{cut}");
    }

    #[test]
    fn a_jwt_expiry_is_read_from_its_payload_and_garbage_is_none() {
        let token = jwt(serde_json::json!({"scope": "com.atproto.appPass", "exp": 1_800_000_000}));
        assert_eq!(
            jwt_expiry(&token),
            DateTime::from_timestamp(1_800_000_000, 0)
        );
        assert_eq!(jwt_expiry("opaque-token"), None);
        assert_eq!(jwt_expiry("a.!!!.c"), None);
        assert_eq!(
            jwt_expiry(&jwt(serde_json::json!({"sub": "did:plc:x"}))),
            None
        );
        assert_eq!(jwt_expiry(&jwt(serde_json::json!({"exp": 1e300}))), None);
    }

    #[test]
    fn a_session_refreshes_a_minute_before_its_access_token_expires() {
        let exp = 1_800_000_000;
        let body = serde_json::json!({
            "did": "did:plc:ewvi7nxzyoun6zhxrhs64oiz",
            "handle": "status.example.com",
            "accessJwt": jwt(serde_json::json!({"exp": exp})),
            "refreshJwt": "refresh",
        });
        let session = Session::read(body.to_string().as_bytes()).unwrap();
        let expiry = DateTime::from_timestamp(exp, 0).unwrap();
        assert!(!session.is_due_for_refresh(expiry - chrono::TimeDelta::seconds(61)));
        assert!(session.is_due_for_refresh(expiry - chrono::TimeDelta::seconds(59)));
        let no_did = serde_json::json!({"did": "x", "accessJwt": "a", "refreshJwt": "r"});
        assert!(Session::read(no_did.to_string().as_bytes()).is_err());
        let newline =
            serde_json::json!({"did": "did:plc:x", "accessJwt": "a\nb", "refreshJwt": "r"});
        assert!(Session::read(newline.to_string().as_bytes()).is_err());
    }

    #[test]
    fn blueskys_rate_limit_reset_is_read_when_nothing_remains() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let reset = "1800000030";
        assert_eq!(
            rate_limit_wait(StatusCode::TOO_MANY_REQUESTS, None, Some(reset), now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            rate_limit_wait(StatusCode::BAD_REQUEST, Some("0"), Some(reset), now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            rate_limit_wait(StatusCode::BAD_REQUEST, Some("5"), Some(reset), now),
            None
        );
        assert_eq!(
            rate_limit_wait(StatusCode::TOO_MANY_REQUESTS, None, Some("soon"), now),
            None
        );
        assert_eq!(
            rate_limit_wait(
                StatusCode::TOO_MANY_REQUESTS,
                None,
                Some("99999999999"),
                now
            ),
            Some(LONGEST_RETRY_AFTER)
        );
    }

    #[test]
    fn a_thread_names_the_first_post_as_root_and_the_latest_as_parent() {
        let first = PostRef {
            uri: "at://did:plc:x/app.bsky.feed.post/3kaaaaaaaaaa2".into(),
            cid: "bafyfirst".into(),
        };
        let second = PostRef {
            uri: "at://did:plc:x/app.bsky.feed.post/3kaaaaaaaaab2".into(),
            cid: "bafysecond".into(),
        };
        let started = receipt(first.clone(), None);
        assert_eq!(started.provider_id.as_deref(), Some(first.uri.as_str()));
        let thread = thread_of(started.thread.as_ref()).unwrap().unwrap();
        assert_eq!((&thread.root, &thread.parent), (&first, &first));
        let replied = receipt(second.clone(), Some(thread));
        let thread = thread_of(replied.thread.as_ref()).unwrap().unwrap();
        assert_eq!((&thread.root, &thread.parent), (&first, &second));

        let mastodon = serde_json::json!({"status_id": "109"});
        assert!(thread_of(Some(&mastodon)).is_err());
        assert_eq!(thread_of(None).unwrap(), None);
    }

    #[test]
    fn only_an_expired_token_is_renewed_and_only_a_spent_refresh_logs_in_again() {
        let answer = |status: u16, code: &str| {
            DeliveryError::permanent("refused")
                .with_status(status)
                .with_code(code)
        };
        assert!(is_expired_token(&answer(400, "ExpiredToken")));
        assert!(is_expired_token(&answer(401, "ExpiredToken")));
        assert!(!is_expired_token(&answer(401, "AuthenticationRequired")));
        assert!(is_spent_refresh(&answer(400, "ExpiredToken")));
        assert!(is_spent_refresh(&answer(401, "AuthenticationRequired")));
        assert!(!is_spent_refresh(&answer(400, "AccountTakedown")));
    }
}
