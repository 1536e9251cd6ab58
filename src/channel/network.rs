//! A provider that could not be reached, in plain words: "could not connect to
//! smtp.example.com:587 (it refused the connection)", for the failures list and the logs,
//! instead of a client library's chain of errors.

use std::io::ErrorKind;

/// Why `error` kept a request from reaching `place` (`host:port`), in one plain sentence.
pub fn unreachable(place: &str, error: &(dyn std::error::Error + 'static)) -> String {
    let io = io_kind(error);
    let text = chain(error).to_ascii_lowercase();
    if matches!(io, Some(ErrorKind::TimedOut)) || text.contains("timed out") {
        return format!("{place} did not answer in time");
    }
    if text.contains("dns error") || text.contains("failed to lookup address") {
        return format!(
            "could not find {} (its name does not resolve)",
            host_of(place)
        );
    }
    let why = match io {
        Some(ErrorKind::ConnectionRefused) => Some("it refused the connection"),
        Some(ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {
            Some("it closed the connection")
        }
        Some(ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable) => {
            Some("no route to it from here")
        }
        Some(ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe) => Some("the connection was cut"),
        _ if text.contains("certificate") || text.contains("tls") => {
            Some("its TLS certificate was not accepted")
        }
        _ => None,
    };
    match why {
        Some(why) => format!("could not connect to {place} ({why})"),
        None => format!("could not connect to {place}"),
    }
}

/// `host:port` of a URL, as a failure names the place it could not reach.
pub fn place_of(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or("the provider");
    match url.port_or_known_default() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

fn host_of(place: &str) -> &str {
    match place.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => place,
    }
}

/// The kind of the first I/O error among `error`'s causes.
fn io_kind(error: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
    let mut cause = Some(error);
    while let Some(inner) = cause {
        if let Some(io) = inner.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cause = inner.source();
    }
    None
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_timed_out_or_unknown_place_is_said_plainly() {
        let refused = std::io::Error::from(ErrorKind::ConnectionRefused);
        assert_eq!(
            unreachable("smtp.example.com:587", &refused),
            "could not connect to smtp.example.com:587 (it refused the connection)"
        );
        let late = std::io::Error::new(ErrorKind::TimedOut, "connecting timed out");
        assert_eq!(
            unreachable("smtp.example.com:587", &late),
            "smtp.example.com:587 did not answer in time"
        );
        let unknown = std::io::Error::other("dns error: failed to lookup address information");
        assert_eq!(
            unreachable("api.example.com:443", &unknown),
            "could not find api.example.com (its name does not resolve)"
        );
        let odd = std::io::Error::other("something else");
        assert_eq!(
            unreachable("api.example.com:443", &odd),
            "could not connect to api.example.com:443"
        );
        let url = reqwest::Url::parse("https://user:pw@api.example.com/hooks?token=x").unwrap();
        assert_eq!(place_of(&url), "api.example.com:443");
    }

    #[tokio::test]
    async fn a_real_refused_connection_names_its_place() {
        // A port nothing listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let error = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap_err();
        let place = place_of(error.url().unwrap());
        assert_eq!(
            unreachable(&place, &error),
            format!("could not connect to 127.0.0.1:{port} (it refused the connection)")
        );
    }
}
