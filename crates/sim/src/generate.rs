//! Realistic activities built from the sample payloads in `samples/`.
//!
//! Each sample becomes a [`Template`]: its bytes with holes where the top-level id, id
//! string and creation time go. Filling a template is a few copies, so the generator costs
//! little even at high rates. Nested ids (retweeted post, user, entities) stay as they
//! are in the sample: they are exactly the traps a consumer's id extraction must avoid.

use bytes::Bytes;

use tandem_core::ids::snowflake;
use tandem_core::time::{rfc3339_ms, twitter_date};
use tandem_core::{ActivityId, identify};

use crate::config::Content;

const NATIVE_POSTS: &str = include_str!("../../../samples/native-posts.ndjson");
const LIKE: &str = include_str!("../../../samples/like.json");

/// A piece of a template: literal bytes or a hole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    Lit(Vec<u8>),
    /// The id as a bare decimal number.
    Id,
    /// The id as a quoted decimal string.
    QuotedId,
    /// The creation time, quoted, in the v1.1 form.
    QuotedTwitterDate,
    /// The creation time, quoted, as RFC 3339.
    QuotedIsoDate,
    /// The creation time as bare milliseconds.
    Millis,
    /// A 128-bit id, quoted, as 32 hex digits.
    QuotedHex128,
}

/// A payload with holes.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    pub pieces: Vec<Piece>,
}

impl Template {
    /// Cuts holes at the values of the given top-level keys of a JSON object.
    fn from_object(json: &str, holes: &[(&str, Piece)]) -> Template {
        let mut spans: Vec<(usize, usize, Piece)> = Vec::new();
        let fields = tandem_core::identity::top_level_fields(json.as_bytes())
            .expect("sample payloads are json objects");
        for (key, range) in fields {
            if let Some((_, piece)) = holes.iter().find(|(k, _)| *k == key) {
                spans.push((range.start, range.end, piece.clone()));
            }
        }
        spans.sort_by_key(|s| s.0);
        let mut pieces = Vec::new();
        let mut at = 0;
        for (start, end, piece) in spans {
            pieces.push(Piece::Lit(json.as_bytes()[at..start].to_vec()));
            pieces.push(piece);
            at = end;
        }
        pieces.push(Piece::Lit(json.as_bytes()[at..].to_vec()));
        Template { pieces }
    }

    /// Appends the filled template to `out` (without a line terminator).
    pub(crate) fn render(&self, id: u128, created_ms: u64, out: &mut Vec<u8>) {
        use std::io::Write;
        for piece in &self.pieces {
            match piece {
                Piece::Lit(bytes) => out.extend_from_slice(bytes),
                Piece::Id => {
                    let _ = write!(out, "{id}");
                }
                Piece::QuotedId => {
                    let _ = write!(out, "\"{id}\"");
                }
                Piece::QuotedTwitterDate => {
                    let _ = write!(out, "\"{}\"", twitter_date(created_ms));
                }
                Piece::QuotedIsoDate => {
                    let _ = write!(out, "\"{}\"", rfc3339_ms(created_ms));
                }
                Piece::Millis => {
                    let _ = write!(out, "{created_ms}");
                }
                Piece::QuotedHex128 => {
                    let _ = write!(out, "\"{id:032x}\"");
                }
            }
        }
    }
}

/// All templates for one kind of content.
#[derive(Debug, Clone)]
pub(crate) struct Templates {
    pub main: Vec<Template>,
}

impl Templates {
    pub(crate) fn for_content(content: Content) -> Templates {
        let posts = || NATIVE_POSTS.lines().filter(|l| !l.trim().is_empty());
        let main = match content {
            Content::Posts => posts()
                .map(|l| {
                    Template::from_object(
                        l,
                        &[
                            ("created_at", Piece::QuotedTwitterDate),
                            ("id", Piece::Id),
                            ("id_str", Piece::QuotedId),
                        ],
                    )
                })
                .collect(),
            Content::ActivityStreams => posts().map(activity_streams_template).collect(),
            Content::V2Posts => posts().map(v2_template).collect(),
            Content::Likes => vec![Template::from_object(
                LIKE.trim_end(),
                &[
                    ("id", Piece::QuotedHex128),
                    ("created_at", Piece::QuotedTwitterDate),
                    ("timestamp_ms", Piece::Millis),
                ],
            )],
        };
        Templates { main }
    }
}

/// The text and author of a native sample post, for the formats that carry less.
fn text_and_author(native: &str) -> (String, String) {
    let v: serde_json::Value =
        serde_json::from_str(native).expect("sample payloads are valid json");
    let text = v["text"].as_str().unwrap_or_default().to_owned();
    let author = v["user"]["id_str"]
        .as_str()
        .unwrap_or("2244994945")
        .to_owned();
    (text, author)
}

fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("strings serialize")
}

fn v2_template(native: &str) -> Template {
    let (text, author) = text_and_author(native);
    Template {
        pieces: vec![
            Piece::Lit(b"{\"data\":{\"id\":".to_vec()),
            Piece::QuotedId,
            Piece::Lit(b",\"edit_history_tweet_ids\":[".to_vec()),
            Piece::QuotedId,
            Piece::Lit(
                format!(
                    "],\"text\":{},\"author_id\":\"{author}\",\"created_at\":",
                    quoted(&text)
                )
                .into_bytes(),
            ),
            Piece::QuotedIsoDate,
            Piece::Lit(
                b"},\"matching_rules\":[{\"id\":\"1166916266197536768\",\"tag\":\"sim\"}]}"
                    .to_vec(),
            ),
        ],
    }
}

fn activity_streams_template(native: &str) -> Template {
    let (text, author) = text_and_author(native);
    Template {
        pieces: vec![
            Piece::Lit(b"{\"id\":\"tag:search.twitter.com,2005:".to_vec()),
            Piece::Id,
            Piece::Lit(b"\",\"objectType\":\"activity\",\"verb\":\"post\",\"postedTime\":".to_vec()),
            Piece::QuotedIsoDate,
            Piece::Lit(
                format!(
                    ",\"actor\":{{\"objectType\":\"person\",\"id\":\"id:twitter.com:{author}\"}},\"body\":{},\"object\":{{\"objectType\":\"note\",\"id\":\"object:search.twitter.com,2005:",
                    quoted(&text)
                )
                .into_bytes(),
            ),
            Piece::Id,
            Piece::Lit(b"\"}}".to_vec()),
        ],
    }
}

/// One generated line.
#[derive(Debug, Clone)]
pub(crate) struct Generated {
    pub line: Bytes,
    /// `None` for system messages.
    pub id: Option<ActivityId>,
    pub created_ms: u64,
}

/// Produces a stream's activities: unique snowflakes whose time is the creation time.
#[derive(Debug)]
pub(crate) struct Generator {
    content: Content,
    templates: Templates,
    worker: u16,
    last_ms: u64,
    sequence: u16,
    produced: u64,
    info_every: u64,
    rng: fastrand::Rng,
}

impl Generator {
    pub(crate) fn new(content: Content, worker: u16, info_every: u64) -> Generator {
        Generator {
            content,
            templates: Templates::for_content(content),
            worker,
            last_ms: 0,
            sequence: 0,
            produced: 0,
            info_every,
            rng: fastrand::Rng::with_seed(u64::from(worker) ^ 0x5eed),
        }
    }

    fn next_snowflake(&mut self, now_ms: u64) -> (u64, u64) {
        if now_ms > self.last_ms {
            self.last_ms = now_ms;
            self.sequence = 0;
        } else if self.sequence == 0xfff {
            self.last_ms += 1;
            self.sequence = 0;
        } else {
            self.sequence += 1;
        }
        (
            snowflake(self.last_ms, self.worker, self.sequence),
            self.last_ms,
        )
    }

    /// The next line at wall-clock time `now_ms`.
    pub(crate) fn next(&mut self, now_ms: u64) -> Generated {
        self.produced += 1;
        if self.info_every > 0 && self.produced.is_multiple_of(self.info_every) {
            let line = format!(
                "{{\"info\":{{\"message\":\"simulator notice: {} activities generated\",\"sent\":\"{}\"}}}}",
                self.produced,
                rfc3339_ms(now_ms)
            );
            return Generated {
                line: Bytes::from(line),
                id: None,
                created_ms: now_ms,
            };
        }
        let mut out = Vec::with_capacity(5_000);
        let roll = self.rng.u32(..100);
        match self.content {
            Content::Likes if roll < 10 => {
                let tweet = snowflake(now_ms.saturating_sub(self.rng.u64(..3_600_000)), 1, 0)
                    | u64::from(self.rng.u16(..0xfff));
                let user = self.rng.u64(1..1 << 40);
                out.extend_from_slice(
                    format!(
                        "{{\"delete\":{{\"favorite\":{{\"tweet_id\":{tweet},\"tweet_id_str\":\"{tweet}\",\"user_id\":{user},\"user_id_str\":\"{user}\"}},\"timestamp_ms\":\"{now_ms}\"}}}}"
                    )
                    .as_bytes(),
                );
            }
            Content::Likes => {
                let id = self.rng.u128(..);
                let template = &self.templates.main[0];
                template.render(id, now_ms, &mut out);
            }
            Content::Posts if roll < 3 => {
                let status = snowflake(now_ms.saturating_sub(self.rng.u64(..86_400_000)), 2, 0)
                    | u64::from(self.rng.u16(..0xfff));
                let user = self.rng.u64(1..1 << 40);
                out.extend_from_slice(
                    format!(
                        "{{\"delete\":{{\"status\":{{\"id\":{status},\"id_str\":\"{status}\",\"user_id\":{user},\"user_id_str\":\"{user}\"}},\"timestamp_ms\":\"{now_ms}\"}}}}"
                    )
                    .as_bytes(),
                );
            }
            Content::Posts | Content::ActivityStreams | Content::V2Posts => {
                let (id, created) = self.next_snowflake(now_ms);
                let k = self.rng.usize(..self.templates.main.len());
                self.templates.main[k].render(u128::from(id), created, &mut out);
                return Generated {
                    line: Bytes::from(out),
                    id: Some(ActivityId::Post(id)),
                    created_ms: created,
                };
            }
        }
        let id = match identify(&out) {
            Ok(tandem_core::LineKind::Activity(id)) => Some(id),
            _ => None,
        };
        Generated {
            line: Bytes::from(out),
            id,
            created_ms: now_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::{LineKind, validate};

    /// Every content kind yields valid JSON whose identity is the one the generator reports.
    #[test]
    fn generated_lines_identify_as_reported() {
        for content in [
            Content::Posts,
            Content::ActivityStreams,
            Content::Likes,
            Content::V2Posts,
        ] {
            let mut g = Generator::new(content, 3, 50);
            let mut ids = std::collections::HashSet::new();
            for i in 0..400 {
                let got = g.next(1_700_000_000_000 + i / 3);
                validate(&got.line).unwrap_or_else(|e| {
                    panic!("{content:?}: {e}: {}", String::from_utf8_lossy(&got.line))
                });
                match (identify(&got.line).unwrap(), got.id) {
                    (LineKind::Activity(a), Some(b)) => {
                        assert_eq!(a, b);
                        assert!(ids.insert(a), "{content:?} repeated {a}");
                    }
                    (LineKind::System(_), None) => {}
                    other => panic!("{content:?}: {other:?}"),
                }
            }
        }
    }

    /// Post ids embed their creation time, and the native `created_at` says the same.
    #[test]
    fn snowflake_time_is_creation_time() {
        let mut g = Generator::new(Content::Posts, 1, 0);
        let now = 1_700_000_000_000;
        let got = (0..50)
            .map(|_| g.next(now))
            .find(|g| matches!(g.id, Some(ActivityId::Post(_))))
            .unwrap();
        let Some(ActivityId::Post(id)) = got.id else {
            unreachable!()
        };
        assert_eq!(tandem_core::ids::snowflake_unix_ms(id), now);
        let v: serde_json::Value = serde_json::from_slice(&got.line).unwrap();
        assert_eq!(v["created_at"].as_str(), Some(twitter_date(now).as_str()));
        assert_ne!(v["user"]["id_str"].as_str(), Some(id.to_string().as_str()));
    }
}
