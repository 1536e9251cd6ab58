//! `scripts/demo.sh`, the newcomer's first command: one promise in its update, a clear stop when
//! its partner port is taken, a clean start on every run, and where to go next.

use std::path::Path;
use std::process::Command;

/// A copy of what the demo reads (the script, the example config, channels and templates) in
/// a folder of its own, so the test's `var/` is its own.
fn demo_folder() -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    for folder in ["scripts", "channels", "templates", "templates/pages"] {
        std::fs::create_dir_all(dir.path().join(folder)).unwrap();
        for entry in std::fs::read_dir(root.join(folder)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(
                    &path,
                    dir.path().join(folder).join(path.file_name().unwrap()),
                )
                .unwrap();
            }
        }
    }
    std::fs::copy(
        root.join("config.example.toml"),
        dir.path().join("config.example.toml"),
    )
    .unwrap();
    dir
}

fn run_demo(dir: &Path) -> std::process::Output {
    Command::new("bash")
        .arg(dir.join("scripts/demo.sh"))
        .env("CRIER_DEMO_BIN", env!("CARGO_BIN_EXE_crier"))
        .env_remove("CRIER_CONFIG")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("bash runs the demo")
}

/// The demo's partner port, 9000, is fixed by channels/partners.toml: the one test that uses
/// it runs every case in turn.
#[test]
fn the_demo_keeps_one_promise_starts_clean_and_stops_clearly_when_its_port_is_taken() {
    let dir = demo_folder();
    let script = std::fs::read_to_string(dir.path().join("scripts/demo.sh")).unwrap();
    assert!(
        !script.contains("Next update by"),
        "the body promises nothing beside --next-update-in"
    );

    // The port taken: one clear line, no traceback, nothing sent.
    let holder = std::net::TcpListener::bind("127.0.0.1:9000");
    if let Ok(_holder) = &holder {
        let output = run_demo(dir.path());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("127.0.0.1:9000 is taken; the demo's partner receiver needs it"),
            "{stderr}"
        );
        assert!(!stderr.contains("Traceback"), "{stderr}");
        assert!(!dir.path().join("var/outbox").exists(), "nothing was sent");
    }
    drop(holder);

    // Twice: each run its own, the second saying what it cleared.
    for run in 0..2 {
        let output = run_demo(dir.path());
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "run {run}:\n{stdout}\n{stderr}");
        assert!(
            stdout.contains("Emails:      1 file(s) in var/outbox/"),
            "run {run}: Ann gets one email, whatever the last run sent:\n{stdout}"
        );
        assert!(
            stdout.contains("webhook ") && stdout.contains("signature valid"),
            "the partner got a signed POST:\n{stdout}"
        );
        assert!(
            stdout.contains("config.example.toml serve")
                && stdout.contains("http://127.0.0.1:8080/"),
            "it says how to see the same thing served:\n{stdout}"
        );
        assert_eq!(
            stdout.contains("starting clean"),
            run == 1,
            "run {run}:\n{stdout}"
        );
    }
    let page = std::fs::read_to_string(dir.path().join("var/status/status.html")).unwrap();
    assert_eq!(page.matches("Next update by").count(), 1, "one promise");
    assert_eq!(page.matches("class=\"card\"").count(), 1, "one incident");
}
