//! A minimal streaming client for testing the simulator on its own: it speaks HTTP with
//! reqwest, inflates gzip with flate2 and splits `\r\n` lines, nothing more.

#![allow(dead_code, unreachable_pub)]

use std::io::Write;
use std::net::IpAddr;
use std::time::Duration;

use tandem_sim::{RateProfile, SimConfig, Simulator, StreamConfig};

pub const USER: &str = "ops@example.com";
pub const PASS: &str = "s3cret";
pub const TOKEN: &str = "bearer-token";

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A Decahose-like stream with short intervals for fast tests.
pub fn fast_gnip(name: &str, per_sec: f64) -> StreamConfig {
    let mut s = StreamConfig::decahose(name, "acme", USER, PASS);
    s.rate = RateProfile::Constant { per_sec };
    s.heartbeat_interval_ms = Some(200);
    s.minute_ms = 1_000;
    s.info_every = 0;
    s
}

pub async fn start(streams: Vec<StreamConfig>) -> Simulator {
    install_crypto();
    Simulator::start(SimConfig {
        streams,
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts")
}

#[derive(Debug, Clone)]
pub enum Auth {
    Basic(&'static str, &'static str),
    Bearer(&'static str),
    None,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Line(Vec<u8>),
    Heartbeat,
    /// The body ended cleanly.
    End,
    /// The body broke (connection dropped) or did not decode.
    Broken(String),
    /// Nothing arrived within the wait.
    Quiet,
}

pub struct Stream {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    body: Option<reqwest::Response>,
    gzip: Option<flate2::write::GzDecoder<Vec<u8>>>,
    pending: Vec<u8>,
    ended: bool,
}

pub fn client(local: Option<IpAddr>) -> reqwest::Client {
    install_crypto();
    let mut b = reqwest::Client::builder();
    if let Some(ip) = local {
        b = b.local_address(ip);
    }
    b.build().unwrap()
}

impl Stream {
    pub async fn open(url: &str, auth: Auth, gzip: bool) -> Stream {
        Self::open_with(&client(None), url, auth, gzip).await
    }

    pub async fn open_with(client: &reqwest::Client, url: &str, auth: Auth, gzip: bool) -> Stream {
        let mut req = client.get(url);
        req = match auth {
            Auth::Basic(u, p) => req.basic_auth(u, Some(p)),
            Auth::Bearer(t) => req.bearer_auth(t),
            Auth::None => req,
        };
        if gzip {
            req = req.header("accept-encoding", "gzip");
        }
        let resp = req.send().await.expect("request reaches the simulator");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        if status != 200 {
            let text = resp.text().await.unwrap_or_default();
            return Stream {
                status,
                headers,
                text,
                body: None,
                gzip: None,
                pending: Vec::new(),
                ended: true,
            };
        }
        let gz = headers
            .get("content-encoding")
            .is_some_and(|v| v == "gzip")
            .then(|| flate2::write::GzDecoder::new(Vec::new()));
        Stream {
            status,
            headers,
            text: String::new(),
            body: Some(resp),
            gzip: gz,
            pending: Vec::new(),
            ended: false,
        }
    }

    fn take_line(&mut self) -> Option<Event> {
        let pos = self.pending.windows(2).position(|w| w == b"\r\n")?;
        let line: Vec<u8> = self.pending.drain(..pos + 2).take(pos).collect();
        Some(if line.is_empty() {
            Event::Heartbeat
        } else {
            Event::Line(line)
        })
    }

    /// The next line, heartbeat, end or break, waiting at most `wait`.
    pub async fn next(&mut self, wait: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(ev) = self.take_line() {
                return ev;
            }
            if self.ended {
                return Event::End;
            }
            let Some(body) = self.body.as_mut() else {
                return Event::End;
            };
            let chunk = match tokio::time::timeout_at(deadline, body.chunk()).await {
                Err(_) => return Event::Quiet,
                Ok(Err(e)) => {
                    self.body = None;
                    return Event::Broken(e.to_string());
                }
                Ok(Ok(None)) => {
                    self.ended = true;
                    continue;
                }
                Ok(Ok(Some(c))) => c,
            };
            match self.gzip.as_mut() {
                Some(dec) => {
                    if let Err(e) = dec.write_all(&chunk).and_then(|()| dec.flush()) {
                        self.body = None;
                        return Event::Broken(format!("gzip: {e}"));
                    }
                    let out = std::mem::take(dec.get_mut());
                    self.pending.extend_from_slice(&out);
                }
                None => self.pending.extend_from_slice(&chunk),
            }
        }
    }

    /// Activity lines received until `want` lines arrived or `quiet` passed without a
    /// line (heartbeats do not count as activity), or the body ended.
    pub async fn lines(&mut self, want: usize, quiet: Duration) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut deadline = tokio::time::Instant::now() + quiet;
        while out.len() < want {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match self.next(left).await {
                Event::Line(l) => {
                    out.push(l);
                    deadline = tokio::time::Instant::now() + quiet;
                }
                Event::Heartbeat => {}
                _ => break,
            }
        }
        out
    }
}

pub fn id_of(line: &[u8]) -> tandem_core::ActivityId {
    match tandem_core::identify(line) {
        Ok(tandem_core::LineKind::Activity(id)) => id,
        other => panic!(
            "not an activity ({other:?}): {}",
            String::from_utf8_lossy(line)
        ),
    }
}

pub fn url(sim: &Simulator, stream: &str, query: &str) -> String {
    format!("{}?{query}", sim.stream_url(stream).unwrap())
}

/// The recovery URL of a stream (the Gnip recovery host, or the v2 live endpoint) with a
/// query.
pub fn recovery_url(sim: &Simulator, stream: &str, query: &str) -> String {
    format!("{}?{query}", sim.recovery_url(stream).unwrap())
}

/// A recovery query for `[start_ms, end_ms)` in the API's spelling.
pub fn range_query(v2: bool, start_ms: u64, end_ms: u64) -> String {
    let (start, end) = if v2 {
        ("start_time", "end_time")
    } else {
        ("startTime", "endTime")
    };
    format!(
        "{start}={}&{end}={}",
        tandem_core::time::rfc3339_ms(start_ms),
        tandem_core::time::rfc3339_ms(end_ms)
    )
}
