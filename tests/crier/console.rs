//! The comms lead's console under `/admin`: signing in (a wrong token, a missing CSRF token
//! and a cross-site POST are refused), the Preview button and Send without JavaScript, and a
//! real browser typing an update, watching the SMS preview pass its limit, sending it and
//! watching the progress reach done, with axe-core checking every page and screenshots at
//! desktop and phone widths.

use crate::serve::{Server, serve};
use crate::support::{Crier, FakeApi, Reply, SmtpSink, wait_until};
use crate::webdriver::{WebDriver, free_port};
use serde_json::json;
use std::time::Duration;

const TOKEN: &str = "lead-token-0123456789abcdefghij";
/// Twilio's test account and number, as the SMS tests use them.
const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap()
}

/// crier with an admin token, email to a real SMTP server, an SMS channel of at most two
/// segments to a Twilio stand-in, and the status page; served on its own public address.
async fn console_crier() -> (Crier, SmtpSink, FakeApi, String) {
    let twilio = FakeApi::start(|_, n| {
        Reply::json(
            201,
            json!({ "sid": format!("SM{n:032}"), "status": "queued" }),
        )
    })
    .await;
    let crier = Crier::new();
    let smtp = SmtpSink::start(crier.dir.path(), 0);
    let base = format!("http://127.0.0.1:{}", free_port());
    let config = std::fs::read_to_string(&crier.config).unwrap();
    let config = config.replace(
        "public_url = \"https://status.example.com\"",
        &format!("public_url = \"{base}\""),
    ) + &format!(
        "[server]\nlisten = \"{}\"\n[api]\ntokens = {{ lead = \"CRIER_API_TOKEN\" }}\n\
         [alerts]\nlead_time = \"3h\"\n",
        &base["http://".len()..]
    );
    std::fs::write(&crier.config, config).unwrap();
    let sms = format!(
        "kind = \"sms\"\nprovider = \"twilio\"\nbase_url = \"{}\"\naccount_sid = \"{ACCOUNT_SID}\"\nauth_token_env = \"TWILIO_AUTH_TOKEN\"\nfrom = \"+15005550006\"\nmax_segments = 2\n",
        twilio.url
    );
    let crier = crier
        .email(smtp.port, "")
        .channel("sms", &sms)
        .status_page()
        .with_env("CRIER_API_TOKEN", TOKEN)
        .with_env("TWILIO_AUTH_TOKEN", "0123456789abcdef0123456789abcdef");
    (crier, smtp, twilio, base)
}

/// The value of `name="…" value="…"` in a page.
fn field(page: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = page
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} field in:\n{page}"))
        + marker.len();
    page[start..][..page[start..].find('"').unwrap()].to_owned()
}

/// What a lead does with the compose form `fields`: presses Send, then Send it now on the
/// confirm step. Returns the confirm step's page and the answer to sending.
async fn send_confirmed(
    base: &str,
    session: &str,
    mut fields: Vec<(&'static str, String)>,
) -> (String, reqwest::Response) {
    let post = |fields: Vec<(&'static str, String)>| {
        client()
            .post(format!("{base}/admin/compose"))
            .header("cookie", session)
            .form(&fields)
            .send()
    };
    let asked = post(fields.clone()).await.unwrap().text().await.unwrap();
    fields.push(("confirmed", field(&asked, "confirmed")));
    let sent = post(fields).await.unwrap();
    (asked, sent)
}

/// The `name=value` of a `Set-Cookie` the answer carries for `name`.
fn set_cookie(answer: &reqwest::Response, name: &str) -> Option<String> {
    answer
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

fn pair(cookie: &str) -> String {
    cookie.split(';').next().unwrap().to_owned()
}

/// Signs in as the lead; returns the session cookie (`name=value`).
async fn sign_in(server: &Server) -> String {
    let page = client()
        .get(format!("{}/admin/login", server.base))
        .send()
        .await
        .unwrap();
    let login_cookie = pair(&set_cookie(&page, "crier_csrf").expect("a CSRF cookie"));
    let csrf = field(&page.text().await.unwrap(), "csrf");
    let answer = client()
        .post(format!("{}/admin/login", server.base))
        .header("cookie", &login_cookie)
        .form(&[("csrf", csrf.as_str()), ("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 303);
    assert_eq!(answer.headers()["location"], "/admin");
    pair(&set_cookie(&answer, "crier_session").expect("a session cookie"))
}

/// The compose page, and the session's CSRF token and the form's key on it.
async fn compose_page(server: &Server, session: &str) -> (String, String, String) {
    let page = client()
        .get(format!("{}/admin", server.base))
        .header("cookie", session)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    let (csrf, key) = (field(&page, "csrf"), field(&page, "key"));
    (page, csrf, key)
}

/// A console page, signed in as `session`.
async fn console_page(url: &str, session: &str) -> String {
    client()
        .get(url)
        .header("cookie", session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The page at `url` once it shows `needle`, or as it last was after 10 s.
async fn page_showing(url: &str, session: &str, needle: &str) -> String {
    let mut shown = String::new();
    for _ in 0..100 {
        shown = console_page(url, session).await;
        if shown.contains(needle) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shown
}

async fn incidents(server: &Server) -> serde_json::Value {
    client()
        .get(format!("{}/api/incidents", server.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_in_refuses_a_wrong_token_a_missing_csrf_token_and_a_cross_site_post() {
    let (crier, _smtp, _twilio, _) = console_crier().await;
    let server = serve(&crier).await;
    let base = &server.base;

    // Signed out, the console sends the lead to sign in.
    let answer = client().get(format!("{base}/admin")).send().await.unwrap();
    assert_eq!(answer.status(), 303);
    assert_eq!(answer.headers()["location"], "/admin/login");

    let page = client()
        .get(format!("{base}/admin/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.headers()["cache-control"], "no-store");
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    let login_cookie = pair(&set_cookie(&page, "crier_csrf").unwrap());
    let csrf = field(&page.text().await.unwrap(), "csrf");
    let try_login = |csrf: &str, token: &str, extra: Option<(&'static str, &'static str)>| {
        let mut request = client()
            .post(format!("{base}/admin/login"))
            .header("cookie", &login_cookie)
            .form(&[("csrf", csrf), ("token", token)]);
        if let Some((name, value)) = extra {
            request = request.header(name, value);
        }
        request.send()
    };

    let wrong = try_login(&csrf, "lead-token-0123456789abcdefghiX", None)
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(set_cookie(&wrong, "crier_session").is_none());
    assert!(
        wrong
            .text()
            .await
            .unwrap()
            .contains("not one of the admin tokens")
    );

    let no_csrf = try_login("", TOKEN, None).await.unwrap();
    assert_eq!(no_csrf.status(), 403);
    assert!(set_cookie(&no_csrf, "crier_session").is_none());

    let cross_site = try_login(&csrf, TOKEN, Some(("sec-fetch-site", "cross-site")))
        .await
        .unwrap();
    assert_eq!(cross_site.status(), 403);
    assert!(set_cookie(&cross_site, "crier_session").is_none());
    let foreign_origin = try_login(&csrf, TOKEN, Some(("origin", "https://evil.example")))
        .await
        .unwrap();
    assert_eq!(foreign_origin.status(), 403);

    let right = try_login(&csrf, TOKEN, Some(("sec-fetch-site", "same-origin")))
        .await
        .unwrap();
    assert_eq!(right.status(), 303);
    let cookie = set_cookie(&right, "crier_session").unwrap();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    let session = pair(&cookie);

    // Signed in, every change still needs the session's CSRF token and the console's origin.
    let (_, session_csrf, key) = compose_page(&server, &session).await;
    let update = [
        ("headline", "Activations delayed"),
        ("body", "We are on it."),
        ("audience", "everyone"),
        ("channel", "email"),
        ("action", "send"),
        ("key", key.as_str()),
    ];
    let without_csrf = client()
        .post(format!("{base}/admin/compose"))
        .header("cookie", &session)
        .form(&update)
        .send()
        .await
        .unwrap();
    assert_eq!(without_csrf.status(), 403);
    let page = without_csrf.text().await.unwrap();
    assert!(page.contains("nothing was sent"), "{page}");
    assert!(
        page.contains("We are on it."),
        "what was typed is kept: {page}"
    );

    let mut with_csrf = update.to_vec();
    with_csrf.push(("csrf", session_csrf.as_str()));
    let cross_site = client()
        .post(format!("{base}/admin/compose"))
        .header("cookie", &session)
        .header("sec-fetch-site", "cross-site")
        .header("origin", "https://evil.example")
        .form(&with_csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site.status(), 403);
    let another_session = sign_in(&server).await;
    let foreign_csrf = client()
        .post(format!("{base}/admin/compose"))
        .header("cookie", &another_session)
        .form(&with_csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(
        foreign_csrf.status(),
        403,
        "a CSRF token is bound to its own session"
    );
    assert_eq!(incidents(&server).await, json!([]), "nothing was sent");

    // Logging out ends the session, even for a copy of its cookie.
    let logout = client()
        .post(format!("{base}/admin/logout"))
        .header("cookie", &session)
        .form(&[("csrf", session_csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), 303);
    assert!(
        set_cookie(&logout, "crier_session")
            .unwrap()
            .contains("Max-Age=0")
    );
    let fragment = client()
        .get(format!(
            "{base}/admin/updates/01ARZ3NDEKTSV4RRFFQ69G5FAV/progress"
        ))
        .header("cookie", &session)
        .header("x-crier-fragment", "progress")
        .send()
        .await
        .unwrap();
    assert_eq!(
        fragment.status(),
        401,
        "the script is told, not sent to sign in"
    );
    let after = client()
        .get(format!("{base}/admin"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 303);
    assert_eq!(after.headers()["location"], "/admin/login");
    crate::subscribe::stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_javascript_preview_shows_every_channel_and_send_goes_once_to_progress() {
    let (crier, smtp, _twilio, _) = console_crier().await;
    crier.subscribe("AB-1001", "ann@example.com").await;
    crier.subscribe("AB-1002", "bob@example.com").await;
    let server = serve(&crier).await;
    let base = &server.base;
    let session = sign_in(&server).await;
    let (page, csrf, key) = compose_page(&server, &session).await;
    for channel in ["email", "sms", "status"] {
        assert!(
            page.contains(&format!("name=\"channel\" value=\"{channel}\" checked")),
            "{channel} is offered and chosen: {page}"
        );
    }
    let post = |fields: Vec<(&'static str, String)>| {
        client()
            .post(format!("{base}/admin/compose"))
            .header("cookie", &session)
            .form(&fields)
            .send()
    };
    let form_to = |orders: &str, body: &str, action: &str, confirmed: &str| {
        vec![
            ("csrf", csrf.clone()),
            ("key", key.clone()),
            ("headline", "Activations delayed".to_owned()),
            ("body", body.to_owned()),
            ("next_update", "2h".to_owned()),
            ("audience", "orders".to_owned()),
            ("orders", orders.to_owned()),
            ("confirmed", confirmed.to_owned()),
            ("channel", "email".to_owned()),
            ("channel", "sms".to_owned()),
            ("channel", "status".to_owned()),
            ("action", action.to_owned()),
        ]
    };
    let form = |body: &str, action: &str| form_to("AB-1001", body, action, "");

    let preview = post(form("We are on it.", "preview")).await.unwrap();
    assert_eq!(preview.status(), 200);
    let preview = preview.text().await.unwrap();
    for channel in ["email", "sms", "status"] {
        assert!(
            preview.contains(&format!("data-channel=\"{channel}\"")),
            "{preview}"
        );
    }
    assert!(
        preview.contains("GSM-7"),
        "the SMS's encoding and segments: {preview}"
    );
    assert!(!preview.contains("Does not fit"), "{preview}");
    // The email's HTML is shown as a mail program shows it, in a frame that runs nothing;
    // its source is folded below.
    assert!(
        preview.contains("<iframe class=\"rendered\" sandbox=\"\" srcdoc=\"&lt;!doctype html&gt;"),
        "{preview}"
    );
    assert!(
        preview.contains("<summary>Its HTML source</summary>"),
        "{preview}"
    );

    let long = "We are on it. ".repeat(30);
    let over = post(form(&long, "preview")).await.unwrap();
    let over = over.text().await.unwrap();
    assert!(over.contains("Does not fit"), "{over}");
    assert!(over.contains("segments"), "{over}");
    let refused = post(form(&long, "send")).await.unwrap();
    assert_eq!(refused.status(), 422);
    assert_eq!(
        incidents(&server).await,
        json!([]),
        "a refused update stores nothing"
    );

    // Send first says who the update reaches, counted as planning counts, and sends nothing.
    let asked = post(form("We are on it.", "send")).await.unwrap();
    assert_eq!(asked.status(), 200);
    let asked = asked.text().await.unwrap();
    assert!(
        asked.contains("This update goes to 1 email and 0 texts."),
        "only AB-1001's subscriber; the status page never takes a targeted update: {asked}"
    );
    assert!(asked.contains("Nothing has been sent yet."), "{asked}");
    assert!(asked.contains("We are on it."), "the text is kept: {asked}");
    assert_eq!(
        incidents(&server).await,
        json!([]),
        "nothing is sent before the confirm step"
    );
    let confirmed = field(&asked, "confirmed");
    // A changed audience after the confirm step is counted and asked again.
    let widened = post(form_to(
        "AB-1001 AB-1002",
        "We are on it.",
        "send",
        &confirmed,
    ))
    .await
    .unwrap();
    assert_eq!(widened.status(), 200);
    let widened = widened.text().await.unwrap();
    assert!(
        widened.contains("This update goes to 2 emails and 0 texts."),
        "{widened}"
    );
    assert_eq!(incidents(&server).await, json!([]));

    let sent = post(form_to("AB-1001", "We are on it.", "send", &confirmed))
        .await
        .unwrap();
    assert_eq!(sent.status(), 303);
    let progress = sent.headers()["location"].to_str().unwrap().to_owned();
    assert!(progress.starts_with("/admin/updates/"), "{progress}");
    // Pressing Send again (the browser resubmitting) answers with the same update.
    let again = post(form_to("AB-1001", "We are on it.", "send", &confirmed))
        .await
        .unwrap();
    assert_eq!(again.headers()["location"].to_str().unwrap(), progress);
    // Back on the sent page, the lead changes the text: that is a new update, asked for again.
    let changed = post(form_to(
        "AB-1001",
        "We are on it. Really.",
        "send",
        &confirmed,
    ))
    .await
    .unwrap();
    assert_eq!(changed.status(), 422);
    let changed = changed.text().await.unwrap();
    assert!(changed.contains("already sent an update"), "{changed}");
    assert!(
        changed.contains("We are on it. Really."),
        "the text is kept: {changed}"
    );
    assert_ne!(
        field(&changed, "key"),
        key,
        "a fresh key for the new update"
    );

    let fragment = format!("{base}{progress}/progress");
    let done = page_showing(&fragment, &session, "data-final=\"true\"").await;
    assert!(done.contains("Done: every delivery is final."), "{done}");
    assert!(wait_until(Duration::from_secs(10), || smtp.count() == 1).await);
    assert_eq!(
        smtp.per_recipient().keys().collect::<Vec<_>>(),
        ["ann@example.com"],
        "only the order's subscriber"
    );
    let listed = incidents(&server).await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(
        listed[0]["updates"].as_array().unwrap().len(),
        1,
        "sent once"
    );

    let shown = console_page(&format!("{base}{progress}"), &session).await;
    assert!(
        shown.contains("Activations delayed") && shown.contains("by lead"),
        "{shown}"
    );

    // The update promised the next within 2 hours, inside the 3-hour lead time: every page
    // carries the watchdog's banner.
    let incidents_page = format!("{base}/admin/incidents");
    let banner = page_showing(&incidents_page, &session, "Update due soon").await;
    assert!(
        banner.contains("the next update on “Activations delayed” is promised by"),
        "the banner shows the promise due soon: {banner}"
    );
    crate::subscribe::stop(server).await;
}

/// Appends `text` to what the field holds, key by key.
async fn type_more(browser: &WebDriver, element: &str, text: &str) {
    browser
        .command(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        )
        .await;
}

/// The SMS preview's measure as shown: its encoding and segments, or why it does not fit.
async fn sms_measure(browser: &WebDriver) -> String {
    browser
        .try_text("article[data-channel=\"sms\"] .measure")
        .await
        .unwrap_or_default()
}

async fn wait_for_measure(browser: &WebDriver, needle: &str) -> String {
    let mut seen = String::new();
    for _ in 0..150 {
        seen = sms_measure(browser).await;
        if seen.contains(needle) {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let previews = browser
        .execute(
            "return document.getElementById('previews').innerHTML;",
            vec![],
        )
        .await;
    panic!("the SMS preview never showed {needle:?}; it shows {seen:?} in {previews}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_signs_in_types_past_the_sms_limit_sends_and_watches_the_progress_finish() {
    let browser = WebDriver::start().await;
    let (crier, smtp, _twilio, base) = console_crier().await;
    for (order, email) in [
        ("AB-1001", "ann@example.com"),
        ("AB-1002", "bob@example.com"),
        ("AB-1003", "cat@example.com"),
    ] {
        crier.subscribe(order, email).await;
    }
    let server = serve(&crier).await;
    browser.set_window_size(1280, 900).await;

    browser.goto(&format!("{base}/admin")).await;
    browser.wait_for_text("h1", "Sign in").await;
    browser.check_accessibility("console sign-in").await;
    browser.set_window_size(360, 800).await;
    assert!(
        !browser.scrolls_sideways().await,
        "the sign-in page fits 360 px"
    );
    browser.screenshot("console-sign-in-phone.png").await;
    browser.set_window_size(1280, 900).await;
    let token = browser.find("#token").await;
    browser.type_into(&token, "not-the-token").await;
    browser.click(&browser.find("#sign-in").await).await;
    browser
        .wait_for_text("#login-error", "not one of the admin tokens")
        .await;
    let token = browser.find("#token").await;
    browser.type_into(&token, TOKEN).await;
    browser.click(&browser.find("#sign-in").await).await;
    browser.wait_for_text("h1", "Compose an update").await;

    let headline = browser.find("#headline").await;
    browser.type_into(&headline, "Activations delayed").await;
    let body = browser.find("#body").await;
    browser.type_into(&body, "We are on it.").await;
    let one = wait_for_measure(&browser, "in 1 segment").await;
    assert!(one.contains("GSM-7"), "{one}");
    browser.check_accessibility("console compose").await;
    browser.screenshot("console-compose-desktop.png").await;

    // Past one segment, then past the channel's two.
    type_more(&browser, &body, &" More soon.".repeat(12)).await;
    wait_for_measure(&browser, "in 2 segments").await;
    type_more(&browser, &body, &" Thank you for waiting.".repeat(8)).await;
    let over = wait_for_measure(&browser, "the limit is 2 segments").await;
    browser
        .wait_for_text("article[data-channel=\"sms\"] h3", "Does not fit")
        .await;
    assert!(over.contains("the SMS takes 3 segments"), "{over}");
    browser
        .check_accessibility("console compose, over the limit")
        .await;

    browser.set_window_size(360, 800).await;
    browser.screenshot("console-compose-phone.png").await;
    let phone_width = browser
        .execute("return document.documentElement.scrollWidth;", vec![])
        .await;
    let viewport = browser.execute("return window.innerWidth;", vec![]).await;
    assert!(
        phone_width.as_u64() <= viewport.as_u64(),
        "the compose page fits a phone's width: {phone_width} > {viewport}"
    );
    browser.set_window_size(1280, 900).await;

    // Back within the limit, to everyone, promising the next update.
    browser
        .type_into(&body, "We are on it. Next update soon.")
        .await;
    wait_for_measure(&browser, "in 1 segment").await;
    let next = browser.find("#next_update").await;
    browser.type_into(&next, "2h").await;
    browser.click(&browser.find("#send").await).await;
    let reach = browser
        .wait_for_text("#confirm-step", "Nothing has been sent yet.")
        .await;
    assert!(
        reach.contains("This update goes to 3 emails and 0 texts, and is posted once on status."),
        "{reach}"
    );
    browser.check_accessibility("console confirm step").await;
    browser.screenshot("console-confirm-desktop.png").await;
    assert_eq!(smtp.count(), 0, "nothing before the confirm step");
    browser.click(&browser.find("#send-confirmed").await).await;
    browser.wait_for_text("h1", "Activations delayed").await;
    let state = browser
        .wait_for_text("#progress-state", "Done: every delivery is final.")
        .await;
    assert!(state.contains("Done"), "{state}");
    assert!(
        wait_until(Duration::from_secs(10), || smtp.count() == 3).await,
        "one email to each subscriber, {} arrived",
        smtp.count()
    );
    let sent = browser
        .text("#progress-table tr[data-channel=\"email\"] td.sent")
        .await;
    assert_eq!(sent, "3");
    browser.check_accessibility("console progress").await;
    browser.screenshot("console-progress-desktop.png").await;
    browser.set_window_size(360, 800).await;
    browser.screenshot("console-progress-phone.png").await;
    let cut_off = browser
        .execute(
            "const wrap = document.querySelector('#progress-table').closest('.table-wrap'); \
             return wrap.scrollWidth > wrap.clientWidth || \
             document.documentElement.scrollWidth > window.innerWidth;",
            vec![],
        )
        .await;
    assert_eq!(cut_off, false, "every column of the progress fits 360 px");
    assert!(browser.is_displayed("#progress-table td.skipped").await);
    browser
        .check_accessibility("console progress, phone-sized")
        .await;
    browser.set_window_size(1280, 900).await;

    browser.goto(&format!("{base}/admin/incidents")).await;
    browser.wait_for_text("h1", "Incidents").await;
    browser
        .wait_for_text("main", "next update promised by")
        .await;
    browser.check_accessibility("console incidents").await;
    browser.set_window_size(360, 800).await;
    assert!(
        !browser.scrolls_sideways().await,
        "the incidents page fits 360 px"
    );
    browser.screenshot("console-incidents-phone.png").await;
    browser.set_window_size(1280, 900).await;

    // Resolving goes through the same compose page, prefilled, and the same Send.
    browser
        .click(&browser.find("a[id^=\"resolve-\"]").await)
        .await;
    browser.wait_for_text("h1", "Compose an update").await;
    assert!(
        browser
            .is_selected("#state option[value=\"resolved\"]")
            .await
    );
    assert!(
        browser
            .is_selected("input[name=\"audience\"][value=\"everyone\"]")
            .await
    );
    browser.select_by_value("#state", "resolved").await;
    assert_eq!(
        browser.property("#body", "value").await,
        "",
        "resolving suggests a text but does not type one"
    );
    assert!(
        browser
            .attribute("#body", "placeholder")
            .await
            .is_some_and(|text| text.starts_with("Say what was fixed")),
    );
    let body = browser.find("#body").await;
    browser
        .type_into(&body, "Activations work again. Sorry for the wait.")
        .await;
    browser
        .wait_for_text("article[data-channel=\"email\"]", "Resolved")
        .await;
    browser.click(&browser.find("#send").await).await;
    browser
        .wait_for_text("#confirm-step", "Nothing has been sent yet.")
        .await;
    browser.click(&browser.find("#send-confirmed").await).await;
    browser
        .wait_for_text("#progress-state", "Done: every delivery is final.")
        .await;
    assert!(
        wait_until(Duration::from_secs(10), || smtp.count() == 6).await,
        "the resolution reached each subscriber, {} emails in all",
        smtp.count()
    );
    browser.goto(&format!("{base}/admin/incidents")).await;
    browser.wait_for_text(".incident .badge", "Resolved").await;
    assert!(
        browser.try_find("a[id^=\"resolve-\"]").await.is_err(),
        "a resolved incident offers no resolve"
    );
    crate::subscribe::stop(server).await;
    drop(browser);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_listed_with_its_reason_and_retried_from_the_progress_page() {
    use crate::support::{Answer, WebhookSink};
    // The partner refuses the first POST for good (400), and takes the retry.
    let partner = WebhookSink::start(&[Answer::status(400)]).await;
    let (crier, _smtp, _twilio, _) = console_crier().await;
    let crier = crier.webhook(&partner.url, "");
    let server = serve(&crier).await;
    let base = &server.base;
    let session = sign_in(&server).await;
    let (_, csrf, key) = compose_page(&server, &session).await;
    let fields = vec![
        ("csrf", csrf.clone()),
        ("key", key.clone()),
        ("headline", "Activations delayed".to_owned()),
        ("body", "We are on it.".to_owned()),
        ("audience", "everyone".to_owned()),
        ("channel", "partners".to_owned()),
        ("action", "send".to_owned()),
    ];
    let (asked, sent) = send_confirmed(base, &session, fields).await;
    assert!(
        asked.contains("This update is posted once on partners."),
        "{asked}"
    );
    assert_eq!(sent.status(), 303);
    let progress = format!("{base}{}", sent.headers()["location"].to_str().unwrap());
    let fragment = format!("{progress}/progress");
    let shown = page_showing(&fragment, &session, "data-final=\"true\"").await;
    assert!(
        shown.contains("every delivery is final, and 1 failed"),
        "{shown}"
    );
    assert!(shown.contains("id=\"retry-dead\""), "{shown}");
    assert!(shown.contains("id=\"failures-link\""), "{shown}");

    let failures = console_page(&format!("{progress}/failures"), &session).await;
    assert!(
        failures.contains("partners") && failures.contains("dead"),
        "{failures}"
    );
    assert!(
        failures.contains("400"),
        "the partner's answer is the reason: {failures}"
    );
    assert!(failures.contains("one post for all"), "{failures}");
    assert!(
        failures.contains("none: it will not be tried again unless you retry it"),
        "{failures}"
    );

    let retried = client()
        .post(format!("{progress}/retry"))
        .header("cookie", &session)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 303);
    assert!(
        wait_until(Duration::from_secs(10), || partner.received().len() == 2).await,
        "the dead letter was sent again"
    );
    let after = page_showing(&fragment, &session, "Done: every delivery is final.").await;
    assert!(after.contains("Done: every delivery is final."), "{after}");
    assert!(!after.contains("retry-dead"), "{after}");
    crate::subscribe::stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_admin_token_ends_the_sessions_it_opened_and_a_restart_keeps_the_others() {
    let (crier, _smtp, _twilio, _) = console_crier().await;
    let server = serve(&crier).await;
    let session = sign_in(&server).await;
    crate::subscribe::stop(server).await;

    // Restarted with the same token, the session holds: it is signed, not kept in memory.
    let server = serve(&crier).await;
    let kept = client()
        .get(format!("{}/admin", server.base))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(kept.status(), 200);
    crate::subscribe::stop(server).await;

    // Restarted with the token rotated, the session it opened is over.
    let crier = crier.with_env("CRIER_API_TOKEN", "lead-token-rotated-0123456789abcdef");
    let server = serve(&crier).await;
    let ended = client()
        .get(format!("{}/admin", server.base))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(ended.status(), 303);
    assert_eq!(ended.headers()["location"], "/admin/login");
    crate::subscribe::stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_that_cannot_be_reached_is_listed_in_plain_words_with_its_next_attempt() {
    let (crier, _smtp, _twilio, _) = console_crier().await;
    let down = crate::support::unused_url();
    let port = down
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches("/hooks")
        .to_owned();
    let crier = crier.webhook(
        &down,
        "[delivery]\nmax_attempts = 5\nbackoff_base = \"10m\"\nbackoff_max = \"1h\"\n",
    );
    let server = serve(&crier).await;
    let base = &server.base;
    let session = sign_in(&server).await;
    let (_, csrf, key) = compose_page(&server, &session).await;
    let fields = vec![
        ("csrf", csrf.clone()),
        ("key", key.clone()),
        ("headline", "Activations delayed".to_owned()),
        ("body", "We are on it.".to_owned()),
        ("audience", "everyone".to_owned()),
        ("channel", "partners".to_owned()),
        ("action", "send".to_owned()),
    ];
    let (_, sent) = send_confirmed(base, &session, fields).await;
    assert_eq!(sent.status(), 303);
    let progress = format!("{base}{}", sent.headers()["location"].to_str().unwrap());
    page_showing(
        &format!("{progress}/progress"),
        &session,
        "1 waiting to retry",
    )
    .await;
    let failures = console_page(&format!("{progress}/failures"), &session).await;
    assert!(
        failures.contains(&format!(
            "could not connect to 127.0.0.1:{port} (it refused the connection)"
        )),
        "{failures}"
    );
    assert!(!failures.contains("tcp connect error"), "{failures}");
    assert!(!failures.contains("client error"), "{failures}");
    let retrying = failures
        .split("<tr>")
        .find(|row| row.contains("retrying"))
        .unwrap_or_else(|| panic!("no retrying row in {failures}"));
    assert!(
        retrying.contains("UTC"),
        "the next attempt's time: {retrying}"
    );
    crate::subscribe::stop(server).await;
}
