//! The in-stream system messages, in each API's own form: Gnip sends
//! `{"error":{"message":…}}` and `{"info":{…}}` lines, X API v2 sends `{"errors":[…]}`
//! problem objects and has no recovery completion message (it closes the stream).

use tandem_core::time::rfc3339_ms;

use crate::config::Api;
use crate::fault::Disconnect;

/// The last line of a connection the simulator ends cleanly, without its `\r\n`: the
/// documented objects verbatim, in their documented field order.
pub(crate) fn disconnect_line(api: &Api, why: Disconnect) -> &'static str {
    match (api, why) {
        (Api::Gnip { .. }, Disconnect::ConnectionLimit) => {
            r#"{"error":{"message":"This stream has been disconnected because a new connection was made and the maximum number of connections has been reached"}}"#
        }
        (Api::Gnip { .. }, Disconnect::FellBehind) => {
            r#"{"error":{"message":"This stream has been disconnected because the client fell behind the retained buffer"}}"#
        }
        (Api::Gnip { .. }, Disconnect::Operational) => {
            r#"{"error":{"message":"This stream has been disconnected for operational reasons."}}"#
        }
        (Api::V2 { .. }, Disconnect::ConnectionLimit) => {
            r#"{"errors":[{"title":"ConnectionException","detail":"This stream is currently at the maximum allowed connection limit.","connection_issue":"TooManyConnections","type":"https://api.twitter.com/2/problems/streaming-connection"}]}"#
        }
        // (choice) the documents name "client too slow" as a reason but show no object.
        (Api::V2 { .. }, Disconnect::FellBehind) => {
            r#"{"errors":[{"title":"operational-disconnect","disconnect_type":"ClientTooSlow","detail":"This stream has been disconnected because your client was unable to keep up.","type":"https://api.twitter.com/2/problems/operational-disconnect"}]}"#
        }
        (Api::V2 { .. }, Disconnect::Operational) => {
            r#"{"errors":[{"title":"operational-disconnect","disconnect_type":"OperationalDisconnect","detail":"This stream has been disconnected for operational reasons.","type":"https://api.twitter.com/2/problems/operational-disconnect"}]}"#
        }
    }
}

/// Gnip's message after the last activity of a recovery range, without its `\r\n`; `None`
/// on v2, whose recovery ends by closing the stream.
pub(crate) fn recovery_completed(api: &Api, sent: u64, now_ms: u64) -> Option<String> {
    match api {
        Api::Gnip { .. } => Some(format!(
            "{{\"info\":{{\"message\":\"Recovery Request Completed\",\"sent\":\"{}\",\"activity_count\":{sent}}}}}",
            rfc3339_ms(now_ms)
        )),
        Api::V2 { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StreamConfig;

    /// Every disconnect line is valid JSON that the consumer's parser takes as a system
    /// message, in the API's own shape.
    #[test]
    fn disconnect_lines_are_system_messages() {
        let gnip = StreamConfig::decahose("d", "a", "u", "p").api;
        let v2 = StreamConfig::v2_filtered("f", "t").api;
        for (api, key) in [(&gnip, "error"), (&v2, "errors")] {
            for why in [
                Disconnect::ConnectionLimit,
                Disconnect::FellBehind,
                Disconnect::Operational,
            ] {
                let line = disconnect_line(api, why);
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert!(v.get(key).is_some(), "{line}");
                assert!(
                    matches!(
                        tandem_core::identify(line.as_bytes()),
                        Ok(tandem_core::LineKind::System(_))
                    ),
                    "{line}"
                );
            }
        }
    }

    /// Only Gnip announces the end of a recovery range.
    #[test]
    fn recovery_completion_is_gnip_only() {
        let gnip = StreamConfig::decahose("d", "a", "u", "p").api;
        let v2 = StreamConfig::v2_sample10("s", "t").api;
        let line = recovery_completed(&gnip, 3, 0).unwrap();
        assert!(
            line.contains("Recovery Request Completed") && line.contains("\"activity_count\":3")
        );
        assert_eq!(recovery_completed(&v2, 3, 0), None);
    }
}
