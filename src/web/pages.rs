//! The pages customers reach from a message: unsubscribe (subscribe and confirm are in
//! `subscribe`).
//! A GET only shows a page; state changes on POST, so a mail scanner that follows every link
//! changes nothing. The unsubscribe POST also takes RFC 8058's one-click body
//! (`List-Unsubscribe=One-Click`) with no cookie and no redirect: the token in the URL is the
//! capability, so no CSRF token is needed.

use super::Shared;
use crate::domain::token::TokenSigner;
use crate::domain::{Contact, FollowVia};
use crate::links::Links;
use crate::render::{BrandView, Renderer};
use crate::store::StoreError;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::Utc;
use serde::Serialize;
use std::sync::Arc;

pub const TEMPLATES: &[&str] = &[
    "pages/unsubscribe",
    "pages/subscribe",
    "pages/confirm",
    "confirm.subject",
    "confirm.txt",
    "confirm.html",
    "confirm.sms",
];

/// What the pages need: their templates, the brand, the links and the token signer.
pub struct Pages {
    pub renderer: Arc<Renderer>,
    pub brand: BrandView,
    pub links: Links,
    pub signer: TokenSigner,
}

#[derive(Serialize, Default)]
struct UnsubscribeView<'a> {
    brand: Option<&'a BrandView>,
    links: Option<&'a Links>,
    contact: String,
    ask: bool,
    done: bool,
    invalid: bool,
}

impl Pages {
    fn render(&self, status: StatusCode, view: UnsubscribeView<'_>) -> Response {
        let view = UnsubscribeView {
            brand: Some(&self.brand),
            links: Some(&self.links),
            ..view
        };
        match self.renderer.render("pages/unsubscribe", &view) {
            Ok(page) => (status, Html(page)).into_response(),
            Err(error) => {
                tracing::error!(%error, "cannot render the unsubscribe page");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the page cannot be shown\n",
                )
                    .into_response()
            }
        }
    }

    /// The contact a genuine, unexpired unsubscribe token names.
    fn contact(&self, token: &str) -> Option<Contact> {
        crate::links::verify_unsubscribe(&self.signer, token, Utc::now()).ok()
    }
}

/// GET: asks, changes nothing.
pub(super) async fn unsubscribe_page(
    State(shared): State<Shared>,
    Path(token): Path<String>,
) -> Response {
    let pages = &shared.pages;
    match pages.contact(&token) {
        Some(contact) => pages.render(
            StatusCode::OK,
            UnsubscribeView {
                contact: contact.masked(),
                ask: true,
                ..UnsubscribeView::default()
            },
        ),
        None => pages.render(
            StatusCode::BAD_REQUEST,
            UnsubscribeView {
                invalid: true,
                ..UnsubscribeView::default()
            },
        ),
    }
}

/// POST: the button's form (`confirm=yes`) or RFC 8058's `List-Unsubscribe=One-Click`.
pub(super) async fn unsubscribe(
    State(shared): State<Shared>,
    Path(token): Path<String>,
    body: Bytes,
) -> Response {
    let pages = &shared.pages;
    let Some(contact) = pages.contact(&token) else {
        return pages.render(
            StatusCode::BAD_REQUEST,
            UnsubscribeView {
                invalid: true,
                ..UnsubscribeView::default()
            },
        );
    };
    let asked = String::from_utf8_lossy(&body);
    let one_click = asked.contains("List-Unsubscribe=One-Click");
    if !one_click && !asked.contains("confirm=yes") {
        return pages.render(
            StatusCode::BAD_REQUEST,
            UnsubscribeView {
                contact: contact.masked(),
                ask: true,
                ..UnsubscribeView::default()
            },
        );
    }
    match shared
        .store
        .unsubscribe(&contact, None, FollowVia::UnsubscribeLink, Utc::now())
        .await
    {
        // Unsubscribing someone the store does not know is already done.
        Ok(_) | Err(StoreError::UnknownSubscriber(_)) => {}
        Err(error) => {
            tracing::error!(%error, "cannot unsubscribe");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "not done: please try again in a minute\n",
            )
                .into_response();
        }
    }
    if one_click {
        return (StatusCode::OK, "unsubscribed\n").into_response();
    }
    pages.render(
        StatusCode::OK,
        UnsubscribeView {
            contact: contact.masked(),
            done: true,
            ..UnsubscribeView::default()
        },
    )
}
