//! The status page channel: status.html, feed.atom and status.json in its folder.

use crate::support::Crier;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_the_feed_and_the_json_show_every_update_newest_first_with_its_promise() {
    let crier = Crier::new().status_page();
    let first = crier
        .send(&["--next-update-in", "2h"], "We're working on it. Sorry.")
        .await;
    let incident = first["incident"].as_str().unwrap();
    let second = crier
        .run(&[
            "send",
            "--yes",
            "--json",
            "--incident",
            incident,
            "--state",
            "identified",
            "--headline",
            "Cause found",
            "The activation queue was stuck.",
        ])
        .await;
    let second = second.assert_ok().json();
    assert_eq!(second["incident"], incident);

    let dir = crier.path("var/status");
    let page = std::fs::read_to_string(dir.join("status.html")).unwrap();
    let newest = page
        .find("The activation queue was stuck.")
        .expect("the second update");
    let oldest = page
        .find("We&#x27;re working on it. Sorry.")
        .expect("the first update");
    assert!(newest < oldest, "newest first");
    assert!(
        !page.contains("Next update by"),
        "the first update's promise was superseded by the second, which makes none: the page \
         shows no promise (the feed and the JSON keep each update's own)"
    );
    assert!(page.contains("Identified"), "the incident's state");

    let feed: atom_syndication::Feed = std::fs::read_to_string(dir.join("feed.atom"))
        .unwrap()
        .parse()
        .unwrap();
    let titles: Vec<String> = feed
        .entries()
        .iter()
        .map(|e| e.title().value.clone())
        .collect();
    assert_eq!(
        titles,
        [
            "[Identified] Cause found",
            "[Investigating] Activations delayed"
        ]
    );
    assert!(
        feed.entries()[1]
            .content()
            .unwrap()
            .value()
            .unwrap()
            .contains("Next update by")
    );

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("status.json")).unwrap()).unwrap();
    assert_eq!(json["latest"]["id"], second["update"]);
    assert_eq!(json["incidents"][0]["state"], "identified");
    assert_eq!(json["incidents"][0]["updates"][1]["id"], first["update"]);
    assert!(json["incidents"][0]["updates"][1]["next_update_by"].is_string());

    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "atomic writes leave no temporary files"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renaming_a_channel_file_keeps_its_past_updates_when_it_keeps_its_id() {
    let crier = Crier::new().status_page();
    crier.send(&[], "First: we're on it.").await;
    std::fs::remove_file(crier.path("channels/status.toml")).unwrap();
    let crier = crier.channel(
        "public-page",
        "kind = \"status_page\"\nid = \"status\"\ndir = \"var/status\"\n",
    );
    crier.send(&[], "Second: found it.").await;
    let page = std::fs::read_to_string(crier.path("var/status/status.html")).unwrap();
    assert!(page.contains("Second: found it."));
    assert!(
        page.contains("First: we"),
        "the update sent before the rename is still on the page"
    );

    // Without the id, the renamed file is another channel, whose page starts empty.
    std::fs::remove_file(crier.path("channels/public-page.toml")).unwrap();
    let crier = crier.channel("renamed", "kind = \"status_page\"\ndir = \"var/renamed\"\n");
    crier.send(&[], "Third: fixed.").await;
    let page = std::fs::read_to_string(crier.path("var/renamed/status.html")).unwrap();
    assert!(page.contains("Third: fixed.") && !page.contains("First: we"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_senders_login_never_reaches_the_public_page_or_a_partner() {
    let hooks = crate::support::WebhookSink::start(&[]).await;
    let crier = Crier::new().status_page().webhook(&hooks.url, "");
    crier
        .send(&["--author", "jsmith-login"], "We're on it.")
        .await;
    let dir = crier.path("var/status");
    for file in ["status.html", "feed.atom", "status.json"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        assert!(text.contains("We"), "{file} holds the update");
        assert!(!text.contains("jsmith-login"), "{file} shows the author");
    }
    let received = hooks.received();
    assert_eq!(received.len(), 1);
    let body = String::from_utf8_lossy(&received[0].body);
    assert!(!body.contains("jsmith-login"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_are_written_in_the_sites_time_zone() {
    let crier = Crier::new().status_page();
    let main = std::fs::read_to_string(&crier.config).unwrap();
    let main = main.replace(
        "public_url = \"https://status.example.com\"\n",
        "public_url = \"https://status.example.com\"\ntime_zone = \"Asia/Tokyo\"\n",
    );
    std::fs::write(&crier.config, main).unwrap();
    let sent = crier
        .send(&["--next-update-in", "2h"], "We're working on it.")
        .await;
    let json = std::fs::read_to_string(crier.path("var/status/status.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let due: chrono::DateTime<chrono::Utc> = json["incidents"][0]["updates"][0]["next_update_by"]
        .as_str()
        .unwrap_or_else(|| panic!("a promise in {json}"))
        .parse()
        .unwrap();
    // Tokyo keeps no summer time: always nine hours ahead of UTC.
    let tokyo = (due + chrono::Duration::hours(9))
        .format("%H:%M JST")
        .to_string();
    let page = std::fs::read_to_string(crier.path("var/status/status.html")).unwrap();
    assert!(
        page.contains(&format!("Next update by {tokyo}")),
        "{tokyo} in {page} (update {sent})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_incident_shows_its_latest_updates_and_links_its_own_page_with_all() {
    let crier = Crier::new().status_page();
    let first = crier.send(&[], "Update 1.").await;
    let incident = first["incident"].as_str().unwrap().to_owned();
    for n in 2..=13 {
        crier
            .run(&[
                "send",
                "--yes",
                "--json",
                "--incident",
                &incident,
                &format!("Update {n}."),
            ])
            .await
            .assert_ok();
    }
    let dir = crier.path("var/status");
    let page = std::fs::read_to_string(dir.join("status.html")).unwrap();
    let shown: Vec<usize> = (1..=13)
        .filter(|n| page.contains(&format!("<p>Update {n}.</p>")))
        .collect();
    assert_eq!(shown, (4..=13).collect::<Vec<_>>(), "the latest ten");
    let history = format!("https://status.example.com/incidents/{incident}.html");
    assert!(
        page.contains(&format!("<a href=\"{history}\">Earlier updates")),
        "{page}"
    );

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("status.json")).unwrap()).unwrap();
    assert_eq!(
        json["incidents"][0]["updates"].as_array().unwrap().len(),
        10
    );
    assert_eq!(json["incidents"][0]["earlier"], true);
    assert_eq!(json["incidents"][0]["history"], history);
    let feed = std::fs::read_to_string(dir.join("feed.atom")).unwrap();
    assert_eq!(feed.matches("<entry>").count(), 10);

    let own = std::fs::read_to_string(dir.join(format!("incidents/{incident}.html"))).unwrap();
    for n in 1..=13 {
        assert!(
            own.contains(&format!("<p>Update {n}.</p>")),
            "update {n} on its page"
        );
    }
    assert!(
        !own.contains("Earlier updates"),
        "its own page holds them all"
    );
}
