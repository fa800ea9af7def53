//! `[websocket]` and `[routes.websocket]`: timeouts, message cap, heartbeats and TCP
//! keepalive of agent WebSockets. A route's table is laid over the global one key by key
//! before anything is checked, so that a route inherits every value it does not set.

use super::context::Ctx;
use super::file::{SpannedString, WebSocketSection};
use super::{
    ConfigError, DEFAULT_CLOSE_TIMEOUT, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PING_INTERVAL,
    DEFAULT_PING_TIMEOUT, DEFAULT_TCP_KEEPALIVE_IDLE, DEFAULT_TCP_KEEPALIVE_INTERVAL,
    DEFAULT_TCP_KEEPALIVE_PROBES,
};
use crate::websocket::heartbeat::Heartbeat;
use crate::websocket::pump::PumpSettings;
use crate::websocket::socket::Keepalive;
use std::time::Duration;

/// Linux's bounds for TCP_KEEPIDLE and TCP_KEEPINTVL (seconds) and TCP_KEEPCNT.
const MAX_KEEPALIVE_SECONDS: u64 = 32767;
const MAX_KEEPALIVE_PROBES: i64 = 127;

impl Ctx<'_> {
    pub(crate) fn extract_websocket(
        &self,
        section: &WebSocketSection,
    ) -> Result<PumpSettings, ConfigError> {
        Ok(PumpSettings {
            idle_timeout: self.duration_or_off(section.idle_timeout.as_ref(), None)?,
            close_timeout: self
                .duration_or(section.close_timeout.as_ref(), DEFAULT_CLOSE_TIMEOUT)?,
            max_message_bytes: self.count_or_off(
                section.max_message_bytes.as_ref(),
                Some(DEFAULT_MAX_MESSAGE_BYTES),
                "`max_message_bytes` is a number of bytes, 0 for no cap",
            )?,
            upstream_lost_code: match &section.upstream_lost_code {
                None => 1011,
                Some(code) => {
                    match *code.get_ref() {
                        1011 => 1011,
                        1014 => 1014,
                        _ => return Err(self.error(
                            code,
                            "`upstream_lost_code` is 1011 (Internal Error) or 1014 (Bad Gateway)",
                        )),
                    }
                }
            },
            client_heartbeat: self.heartbeat(
                section.ping_interval.as_ref(),
                section.ping_timeout.as_ref(),
            )?,
            upstream_heartbeat: self.heartbeat(
                section.upstream_ping_interval.as_ref(),
                section.upstream_ping_timeout.as_ref(),
            )?,
            tcp_keepalive: self.keepalive(section)?,
        })
    }

    /// A side's heartbeat: off when its interval is `0s`.
    fn heartbeat(
        &self,
        interval: Option<&SpannedString>,
        timeout: Option<&SpannedString>,
    ) -> Result<Option<Heartbeat>, ConfigError> {
        let timeout = self.duration_or_off(timeout, Some(DEFAULT_PING_TIMEOUT))?;
        Ok(self
            .duration_or_off(interval, Some(DEFAULT_PING_INTERVAL))?
            .map(|interval| Heartbeat { interval, timeout }))
    }

    fn keepalive(&self, section: &WebSocketSection) -> Result<Option<Keepalive>, ConfigError> {
        // `what` starts the error message: which key, and what else it may be.
        let seconds = |value: Option<&SpannedString>, default: Duration, what: &str| {
            let Some(value) = value else {
                return Ok(default);
            };
            let d = self.duration(value)?;
            if d.subsec_nanos() != 0 || !(1..=MAX_KEEPALIVE_SECONDS).contains(&d.as_secs()) {
                return Err(self.error(
                    value,
                    format!("{what} whole seconds from \"1s\" to \"{MAX_KEEPALIVE_SECONDS}s\""),
                ));
            }
            Ok(d)
        };
        let idle = match &section.tcp_keepalive_idle {
            Some(v) if self.duration(v)?.is_zero() => None,
            idle => Some(seconds(
                idle.as_ref(),
                DEFAULT_TCP_KEEPALIVE_IDLE,
                "`tcp_keepalive_idle` is \"0s\" (off) or",
            )?),
        };
        let interval = seconds(
            section.tcp_keepalive_interval.as_ref(),
            DEFAULT_TCP_KEEPALIVE_INTERVAL,
            "`tcp_keepalive_interval` is",
        )?;
        let probes = match &section.tcp_keepalive_probes {
            None => DEFAULT_TCP_KEEPALIVE_PROBES,
            Some(p) => u32::try_from(*p.get_ref())
                .ok()
                .filter(|n| (1..=MAX_KEEPALIVE_PROBES).contains(&i64::from(*n)))
                .ok_or_else(|| {
                    self.error(
                        p,
                        format!("`tcp_keepalive_probes` is a whole number from 1 to {MAX_KEEPALIVE_PROBES}"),
                    )
                })?,
        };
        Ok(idle.map(|idle| Keepalive {
            idle,
            interval,
            probes,
        }))
    }
}

/// `route`'s `[routes.websocket]` laid over the global `[websocket]`.
pub(crate) fn over(route: &WebSocketSection, global: &WebSocketSection) -> WebSocketSection {
    WebSocketSection {
        idle_timeout: route
            .idle_timeout
            .clone()
            .or_else(|| global.idle_timeout.clone()),
        close_timeout: route
            .close_timeout
            .clone()
            .or_else(|| global.close_timeout.clone()),
        upstream_lost_code: route
            .upstream_lost_code
            .clone()
            .or_else(|| global.upstream_lost_code.clone()),
        max_message_bytes: route
            .max_message_bytes
            .clone()
            .or_else(|| global.max_message_bytes.clone()),
        ping_interval: route
            .ping_interval
            .clone()
            .or_else(|| global.ping_interval.clone()),
        ping_timeout: route
            .ping_timeout
            .clone()
            .or_else(|| global.ping_timeout.clone()),
        upstream_ping_interval: route
            .upstream_ping_interval
            .clone()
            .or_else(|| global.upstream_ping_interval.clone()),
        upstream_ping_timeout: route
            .upstream_ping_timeout
            .clone()
            .or_else(|| global.upstream_ping_timeout.clone()),
        tcp_keepalive_idle: route
            .tcp_keepalive_idle
            .clone()
            .or_else(|| global.tcp_keepalive_idle.clone()),
        tcp_keepalive_interval: route
            .tcp_keepalive_interval
            .clone()
            .or_else(|| global.tcp_keepalive_interval.clone()),
        tcp_keepalive_probes: route
            .tcp_keepalive_probes
            .clone()
            .or_else(|| global.tcp_keepalive_probes.clone()),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{error_of, parse, GOOD};
    use crate::websocket::heartbeat::Heartbeat;
    use crate::websocket::socket::Keepalive;
    use std::time::Duration;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn websocket_settings() {
        let text = GOOD.to_owned()
            + "[websocket]\nidle_timeout = \"5m\"\nclose_timeout = \"500ms\"\nmax_message_bytes = 0\nupstream_lost_code = 1014\n";
        let ws = parse(&text).expect("valid").websocket;
        assert_eq!(ws.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(ws.close_timeout, Duration::from_millis(500));
        assert_eq!(ws.max_message_bytes, None);
        assert_eq!(ws.upstream_lost_code, 1014);
        let ws = parse(&(GOOD.to_owned() + "[websocket]\nidle_timeout = \"0s\"\n"))
            .expect("valid")
            .websocket;
        assert_eq!(ws.idle_timeout, None);
        let err = error_of(&(GOOD.to_owned() + "[websocket]\nmax_message_bytes = -1\n"));
        assert!(
            err.contains("`max_message_bytes` is a number of bytes, 0 for no cap"),
            "{err}"
        );
        let err = error_of(&(GOOD.to_owned() + "[websocket]\nupstream_lost_code = 1000\n"));
        assert!(err.contains("`upstream_lost_code` is 1011"), "{err}");
    }

    #[test]
    fn heartbeats_and_keepalive_default_on() {
        let ws = parse(GOOD).expect("valid").websocket;
        let default = Some(Heartbeat {
            interval: secs(25),
            timeout: Some(secs(10)),
        });
        assert_eq!(ws.client_heartbeat, default);
        assert_eq!(ws.upstream_heartbeat, default);
        assert_eq!(
            ws.tcp_keepalive,
            Some(Keepalive {
                idle: secs(60),
                interval: secs(10),
                probes: 6
            })
        );
    }

    #[test]
    fn zero_turns_each_off() {
        let text = GOOD.to_owned()
            + "[websocket]\nping_interval = \"0s\"\nupstream_ping_timeout = \"0s\"\ntcp_keepalive_idle = \"0s\"\n";
        let ws = parse(&text).expect("valid").websocket;
        assert_eq!(ws.client_heartbeat, None);
        assert_eq!(
            ws.upstream_heartbeat,
            Some(Heartbeat {
                interval: secs(25),
                timeout: None
            })
        );
        assert_eq!(ws.tcp_keepalive, None);
    }

    #[test]
    fn keepalive_values_are_checked_where_they_stand() {
        let with = |line: &str| error_of(&format!("{GOOD}[websocket]\n{line}\n"));
        let err = with("tcp_keepalive_idle = \"500ms\"");
        assert!(
            err.starts_with("gateway.toml:25:22: `tcp_keepalive_idle` is \"0s\" (off) or whole seconds from \"1s\" to \"32767s\""),
            "{err}"
        );
        let err = with("tcp_keepalive_interval = \"0s\"");
        assert!(
            err.contains("`tcp_keepalive_interval` is whole seconds from \"1s\""),
            "{err}"
        );
        let err = with("tcp_keepalive_interval = \"10h\"");
        assert!(err.contains("`tcp_keepalive_interval`"), "{err}");
        for probes in ["0", "128", "-1"] {
            let err = with(&format!("tcp_keepalive_probes = {probes}"));
            assert!(
                err.contains("`tcp_keepalive_probes` is a whole number from 1 to 127"),
                "{probes}: {err}"
            );
        }
        let err = with("ping_timeout = \"soon\"");
        assert!(err.contains("a duration is a number with a unit"), "{err}");
    }

    /// A route's table overrides the global one key by key; agents carry their route's.
    #[test]
    fn routes_override_key_by_key() {
        let text = GOOD.replacen(
            "[[routes.agents]]",
            "[routes.websocket]\nping_interval = \"5s\"\nidle_timeout = \"1m\"\n\n[[routes.agents]]",
            1,
        ) + "[websocket]\nping_timeout = \"3s\"\nping_interval = \"0s\"\ntcp_keepalive_probes = 3\n";
        let config = parse(&text).expect("valid");
        assert_eq!(config.websocket.client_heartbeat, None);
        let route = &config.routes[0].agents["coderagent"].websocket;
        assert_eq!(
            route.client_heartbeat,
            Some(Heartbeat {
                interval: secs(5),
                timeout: Some(secs(3))
            })
        );
        assert_eq!(route.idle_timeout, Some(secs(60)));
        assert_eq!(route.tcp_keepalive.map(|k| k.probes), Some(3));
        assert_eq!(
            route.upstream_heartbeat,
            config.websocket.upstream_heartbeat
        );
        let err = error_of(&GOOD.replacen(
            "[[routes.agents]]",
            "[routes.websocket]\nping_intervall = \"5s\"\n\n[[routes.agents]]",
            1,
        ));
        assert!(err.contains("unknown field `ping_intervall`"), "{err}");
        let err = error_of(&GOOD.replacen(
            "[[routes.agents]]",
            "[routes.websocket]\ntcp_keepalive_probes = 0\n\n[[routes.agents]]",
            1,
        ));
        assert!(err.starts_with("gateway.toml:17:24: "), "{err}");
    }
}
