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
    assert!(page.contains("Next update by"), "the promise is shown");
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
