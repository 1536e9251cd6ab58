//! `crier import`: good rows imported, bad rows refused with their line and reason, duplicates
//! merged, and a killed import run again doubling nothing.

use crate::support::{Crier, wait_until};
use std::time::Duration;

const FILE: &str = "order,email,phone,confirmed
AB-1001,ann@example.com,,true
AB-1002,Ann@Example.com,+447700900123,yes
12345,bob@example.com,,true
AB-1003,not-an-email,,true
AB-1004,,+44123,true
AB-1001,ann@example.com,,true
AB-1005,,,true
AB-1006,cy@example.com,,maybe
AB-1007,dee@example.com,,
AB-1008,eve@example.com,,true,surplus
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_of_good_bad_and_duplicate_rows_gives_the_exact_report() {
    let crier = Crier::new().status_page();
    let file = crier.path("subscribers.csv");
    std::fs::write(&file, FILE).unwrap();

    let dry = crier
        .run(&["import", "--dry-run", "--json", file.to_str().unwrap()])
        .await;
    assert_eq!(dry.code, 1, "rows were refused\n{}", dry.stderr);
    assert_eq!(
        crier.store().await.subscriber_count().await.unwrap(),
        0,
        "a dry run stores nothing"
    );

    let output = crier
        .run(&["import", "--json", file.to_str().unwrap()])
        .await;
    assert_eq!(output.code, 1, "rows were refused\n{}", output.stderr);
    assert!(
        output.stderr.contains("6 rows refused"),
        "{}",
        output.stderr
    );
    let report = &output.json()["report"];
    assert_eq!(report, &dry.json()["report"], "the dry run predicted it");
    assert_eq!(report["rows"], 10);
    // ann@ follows AB-1001 and AB-1002, the phone AB-1002, dee@ AB-1007 (unconfirmed).
    assert_eq!(report["imported"], 4);
    assert_eq!(report["new_subscribers"], 3);
    assert_eq!(report["duplicates"], 1);
    assert_eq!(report["refused"], 6);
    let refusals: Vec<(u64, String)> = report["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["line"].as_u64().unwrap(),
                r["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        (4, "'12345' is not an order number"),
        (5, "'not-an-email' is not an email address"),
        (6, "wrong number of digits"),
        (8, "neither an email nor a phone"),
        (9, "confirmed is 'maybe'"),
        (11, "the row has 5 fields; the header has 4"),
    ];
    assert_eq!(refusals.len(), expected.len(), "{refusals:?}");
    for ((line, reason), (want_line, want_reason)) in refusals.iter().zip(expected) {
        assert_eq!(*line, want_line, "{reason}");
        assert!(reason.contains(want_reason), "line {line}: {reason}");
    }
    let store = crier.store().await;
    assert_eq!(store.subscriber_count().await.unwrap(), 3);
    let ann = store
        .subscriber(&crier::domain::Contact::parse("ann@example.com").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ann.orders().len(), 2);
    assert!(ann.receives_updates());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_with_an_unknown_column_stops_the_import_before_any_row() {
    let crier = Crier::new().status_page();
    let file = crier.path("subscribers.csv");
    std::fs::write(&file, "order,mail\nAB-1001,ann@example.com\n").unwrap();
    crier
        .run(&["import", file.to_str().unwrap()])
        .await
        .assert_user_error("unknown column 'mail'");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_from_standard_input_are_imported() {
    let crier = Crier::new().status_page();
    let mut command = crier.command(&["import", "--format", "jsonl", "--json", "-"]);
    command.stdin(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(
                b"{\"order\": \"AB-1001\", \"email\": \"ann@example.com\", \"confirmed\": true}\n\
                  {\"order\": \"AB-1002\", \"phone\": \"+447700900123\"}\n",
            )
            .await
            .unwrap();
    }
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["report"]["imported"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_killed_midway_and_run_again_doubles_nothing() {
    const ROWS: usize = 60_000;
    let crier = Crier::new().status_page();
    let file = crier.path("subscribers.csv");
    let mut text = String::from("order,email,phone,confirmed\n");
    for i in 0..ROWS {
        text.push_str(&format!("AB-{},c{i}@example.com,,true\n", 1_000_000 + i));
    }
    std::fs::write(&file, text).unwrap();

    // Small batches, so the kill lands between many commits.
    let mut import = crier
        .command(&["import", "--batch", "50", file.to_str().unwrap()])
        .spawn()
        .unwrap();
    let store_dir = crier.path("var/store");
    // Kill once the store has taken some writes, well before the end.
    let started = wait_until(Duration::from_secs(60), || {
        std::fs::read_dir(&store_dir).is_ok_and(|mut entries| entries.next().is_some())
    })
    .await;
    assert!(started, "the import opened the store");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let still_running = import.try_wait().unwrap().is_none();
    import.start_kill().unwrap();
    import.wait().await.unwrap();

    let partial = crier.store().await.subscriber_count().await.unwrap() as usize;
    println!("killed after {partial} of {ROWS} rows (still running: {still_running})");
    assert!(partial < ROWS || !still_running);

    let again = crier
        .run(&["import", "--json", file.to_str().unwrap()])
        .await;
    again.assert_ok();
    let report = &again.json()["report"];
    assert_eq!(report["rows"], ROWS as u64);
    assert_eq!(
        report["imported"].as_u64().unwrap() + report["duplicates"].as_u64().unwrap(),
        ROWS as u64,
        "{report}"
    );
    assert_eq!(
        report["duplicates"].as_u64().unwrap() as usize,
        partial,
        "the rows stored before the kill are exactly the duplicates"
    );
    assert_eq!(
        crier.store().await.subscriber_count().await.unwrap() as usize,
        ROWS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_refused_value_is_quoted_short_in_every_reason() {
    let crier = Crier::new();
    let huge = "x".repeat(1_000_000);
    let csv = crier.path("huge.csv");
    std::fs::write(
        &csv,
        format!("order,email,phone,confirmed\nAB-1001,{huge}@,,\n{huge},ann@example.com,,\nAB-1002,bob@example.com,,{huge}\n"),
    )
    .unwrap();
    let jsonl = crier.path("huge.jsonl");
    std::fs::write(
        &jsonl,
        format!("{{\"order\":\"AB-1001\",\"email\":\"ann@example.com\",\"confirmed\":\"{huge}\"}}\n{{\"order\":\"AB-1001\",\"email\":\"ann@example.com\",\"confirmed\":[\"{huge}\"]}}\n"),
    )
    .unwrap();
    for file in [&csv, &jsonl] {
        let output = crier
            .run(&["import", "--json", file.to_str().unwrap()])
            .await;
        assert_eq!(output.code, 1, "{}", output.stderr);
        assert!(
            output.stdout.len() < 4_000,
            "{} bytes of report",
            output.stdout.len()
        );
        let report = output.json();
        let refusals = report["report"]["refusals"].as_array().unwrap();
        assert!(!refusals.is_empty(), "{report}");
        for refusal in refusals {
            let reason = refusal["reason"].as_str().unwrap();
            assert!(reason.chars().count() <= 201, "{reason}");
        }
        let text = crier.run(&["import", file.to_str().unwrap()]).await;
        assert!(text.stdout.len() + text.stderr.len() < 4_000);
    }
    let output = crier
        .run(&["import", "--json", csv.to_str().unwrap()])
        .await;
    let reasons = output.stdout;
    assert!(reasons.contains("(1000001 characters)"), "{reasons}");
}
