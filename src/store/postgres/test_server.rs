//! A real PostgreSQL for tests, from Debian's `postgresql` package: `initdb` into a fresh
//! folder as an unprivileged user, the server on a free port on 127.0.0.1, stopped and its
//! folder removed when the test (or, for the shared one, the test process) ends.
//!
//! The server runs under a small shell that stops it as soon as its standard input closes,
//! and the test process holds the other end: however the test process ends, even killed, the
//! server goes with it.
//!
//! The integration tests include this file too (`#[path]`); each test binary uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The superuser `initdb` creates; tests connect as it, without a password, over TCP on
/// 127.0.0.1 only.
const SUPERUSER: &str = "crier";
const STARTUP: Duration = Duration::from_secs(60);

/// Starts the server, waits for the end of standard input, stops it fast and removes its
/// folder.
const SUPERVISOR: &str = r#"
bin="$1"; dir="$2"; port="$3"
"$bin/postgres" -D "$dir/data" -p "$port" -c listen_addresses=127.0.0.1 \
  -c unix_socket_directories="$dir" -c fsync=off -c full_page_writes=off \
  -c max_connections=300 -c shared_buffers=32MB </dev/null >>"$dir/server.log" 2>&1 &
pid=$!
while read -r line; do :; done
kill -INT "$pid" 2>/dev/null
wait "$pid"
if [ "${KEEP:-}" != 1 ]; then rm -rf "$dir"; fi
"#;

pub struct PostgresServer {
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
    /// The owner (uid, gid) the server runs as: never root, which PostgreSQL refuses.
    user: Option<(u32, u32)>,
    supervisor: Option<(Child, ChildStdin)>,
    /// Whether the supervisor removes the folder as it stops (else `Drop` does).
    remove_on_exit: bool,
    databases: AtomicU32,
}

impl PostgresServer {
    /// One server for the whole test process, started on first use.
    pub fn shared() -> &'static PostgresServer {
        static SHARED: OnceLock<PostgresServer> = OnceLock::new();
        SHARED.get_or_init(|| {
            let mut server = PostgresServer::prepare();
            // Never dropped: the supervisor removes the folder when the process ends.
            server.remove_on_exit = true;
            server.resume();
            server
        })
    }

    /// A server of its own, stopped when dropped.
    pub fn start() -> Self {
        let mut server = Self::prepare();
        server.resume();
        server
    }

    /// A fresh data folder, not started yet.
    fn prepare() -> Self {
        let bin = binaries().unwrap_or_else(|| {
            panic!(
                "PostgreSQL is not installed (apt-get install postgresql, as scripts/test.sh \
                 does): no /usr/lib/postgresql/*/bin/initdb"
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("crier-pg-")
            .tempdir()
            .expect("a temporary folder")
            .keep();
        let user = unprivileged_user();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown the folder");
        }
        let initdb = as_user(Command::new(bin.join("initdb")), user)
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync"])
            .args(["--locale=C"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("initdb runs");
        assert!(
            initdb.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        Self {
            bin,
            dir,
            port: free_port(),
            user,
            supervisor: None,
            remove_on_exit: false,
            databases: AtomicU32::new(0),
        }
    }

    /// Starts the server again after [`PostgresServer::stop`], on the same port and data.
    pub fn resume(&mut self) {
        assert!(self.supervisor.is_none(), "the server is already running");
        let mut child = as_user(Command::new("sh"), self.user)
            .arg("-c")
            .arg(SUPERVISOR)
            .arg("sh")
            .arg(&self.bin)
            .arg(&self.dir)
            .arg(self.port.to_string())
            .env("KEEP", if self.remove_on_exit { "0" } else { "1" })
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh starts");
        let stdin = child.stdin.take().expect("the supervisor's stdin");
        self.supervisor = Some((child, stdin));
        self.wait_until_ready();
    }

    /// Stops the server (fast shutdown: sessions are cut, nothing committed is lost).
    pub fn stop(&mut self) {
        if let Some((mut child, stdin)) = self.supervisor.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }

    fn wait_until_ready(&self) {
        let deadline = Instant::now() + STARTUP;
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    SUPERUSER,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start within {STARTUP:?}: {}",
                std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A fresh, empty database, and the connection string for it.
    pub fn database(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            self.databases.fetch_add(1, Ordering::SeqCst)
        );
        let created = Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
            ])
            .arg(&name)
            .stderr(Stdio::piped())
            .output()
            .expect("createdb runs");
        assert!(
            created.status.success(),
            "createdb failed: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        self.url(&name)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// What the server logged, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where Debian keeps the server's programs (the newest version installed).
fn binaries() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    found.sort_by_key(|bin| {
        bin.parent()
            .and_then(Path::file_name)
            .and_then(|name| name.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop()
}

/// As root, the `postgres` user the package creates (or `nobody`); otherwise ourselves.
fn unprivileged_user() -> Option<(u32, u32)> {
    let me = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    ["postgres", "nobody"].iter().find_map(|name| {
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() > 3 && fields[0] == *name)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
    })
}

fn as_user(mut command: Command, user: Option<(u32, u32)>) -> Command {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
        // Its own HOME, so nothing looks for root's.
        command.env("HOME", "/tmp");
    }
    command
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port on 127.0.0.1")
}
