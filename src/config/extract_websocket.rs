//! `[websocket]`, `[routes.websocket]` and `[routes.agents.websocket]`: timeouts, message
//! cap, heartbeats, TCP keepalive and rate limits of agent WebSockets. A route's table is laid
//! over the global one key by key before anything is checked (and an agent's over its
//! route's), so that each inherits every value it does not set.

use super::context::Ctx;
use super::file::{SpannedString, WebSocketSection};
use super::{
    ConfigError, DEFAULT_CLOSE_TIMEOUT, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PING_INTERVAL,
    DEFAULT_PING_TIMEOUT, DEFAULT_TCP_KEEPALIVE_IDLE, DEFAULT_TCP_KEEPALIVE_INTERVAL,
    DEFAULT_TCP_KEEPALIVE_PROBES,
};
use crate::websocket::heartbeat::Heartbeat;
use crate::websocket::pump::PumpSettings;
use crate::websocket::rate_limit::{Rate, RateLimitAction, RateLimits};
use crate::websocket::socket::Keepalive;
use std::num::NonZeroU32;
use std::time::Duration;
use toml::Spanned;

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
            rate_limits: self.rate_limits(section)?,
        })
    }

    /// The rate limits: `None` when no limit is set (0 is no limit).
    fn rate_limits(&self, section: &WebSocketSection) -> Result<Option<RateLimits>, ConfigError> {
        let s = section;
        let limits = RateLimits {
            messages: self.rate(
                s.client_messages_per_second.as_ref(),
                s.client_message_burst.as_ref(),
                ("client_messages_per_second", "client_message_burst"),
            )?,
            bytes: self.rate(
                s.client_bytes_per_second.as_ref(),
                s.client_bytes_burst.as_ref(),
                ("client_bytes_per_second", "client_bytes_burst"),
            )?,
            per_client_messages: self.rate(
                s.per_client_messages_per_second.as_ref(),
                s.per_client_message_burst.as_ref(),
                ("per_client_messages_per_second", "per_client_message_burst"),
            )?,
            per_client_bytes: self.rate(
                s.per_client_bytes_per_second.as_ref(),
                s.per_client_bytes_burst.as_ref(),
                ("per_client_bytes_per_second", "per_client_bytes_burst"),
            )?,
            action: match &s.rate_limit_action {
                None => RateLimitAction::Close,
                Some(a) => match a.get_ref().as_str() {
                    "close" => RateLimitAction::Close,
                    "throttle" => RateLimitAction::Throttle,
                    _ => {
                        return Err(
                            self.error(a, "`rate_limit_action` is \"close\" or \"throttle\"")
                        )
                    }
                },
            },
        };
        let any = limits.each().iter().any(|(_, rate)| rate.is_some());
        Ok(any.then_some(limits))
    }

    /// One bucket from its rate and burst keys (`keys`): no bucket for a rate of 0 or none;
    /// the burst defaults (absent or 0) to one second's worth.
    fn rate(
        &self,
        per_second: Option<&Spanned<i64>>,
        burst: Option<&Spanned<i64>>,
        keys: (&str, &str),
    ) -> Result<Option<Rate>, ConfigError> {
        let (rate_key, burst_key) = keys;
        let whole = |v: &Spanned<i64>, what: String| {
            u32::try_from(*v.get_ref()).map_err(|_| self.error(v, what))
        };
        let rate = match per_second {
            None => None,
            Some(v) => NonZeroU32::new(whole(
                v,
                format!(
                    "`{rate_key}` is a whole number up to {}, 0 for no limit",
                    u32::MAX
                ),
            )?),
        };
        // 0 is the default, as absent: one second's worth.
        let burst = match burst {
            None => None,
            Some(v) => {
                let what = format!("`{burst_key}` is a whole number up to {}", u32::MAX);
                NonZeroU32::new(whole(v, what)?).map(|n| (v, n))
            }
        };
        match (rate, burst) {
            (Some(rate), burst) => Ok(Some(Rate {
                per_second: rate,
                burst: burst.map_or(rate, |(_, b)| b),
            })),
            // A rate of 0 turns the limit off, whatever burst comes with it (from
            // [websocket], say); a burst without any rate is a mistake.
            (None, Some((v, _))) if per_second.is_none() => {
                Err(self.error(v, format!("`{burst_key}` needs `{rate_key}`")))
            }
            _ => Ok(None),
        }
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

/// `route`'s `[routes.websocket]` laid over the global `[websocket]` (or an agent's table
/// over its route's): each key the first leaves out comes from the second.
pub(crate) fn over(route: &WebSocketSection, global: &WebSocketSection) -> WebSocketSection {
    // A struct literal: a key added to the section and forgotten here does not compile.
    macro_rules! each_key {
        ($($key:ident),* $(,)?) => {
            WebSocketSection {
                $($key: route.$key.clone().or_else(|| global.$key.clone()),)*
            }
        };
    }
    each_key!(
        idle_timeout,
        close_timeout,
        upstream_lost_code,
        max_message_bytes,
        ping_interval,
        ping_timeout,
        upstream_ping_interval,
        upstream_ping_timeout,
        tcp_keepalive_idle,
        tcp_keepalive_interval,
        tcp_keepalive_probes,
        client_messages_per_second,
        client_message_burst,
        client_bytes_per_second,
        client_bytes_burst,
        per_client_messages_per_second,
        per_client_message_burst,
        per_client_bytes_per_second,
        per_client_bytes_burst,
        rate_limit_action,
    )
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{error_of, parse, GOOD};
    use crate::websocket::heartbeat::Heartbeat;
    use crate::websocket::rate_limit::{Rate, RateLimitAction, RateLimits};
    use crate::websocket::socket::Keepalive;
    use std::num::NonZeroU32;
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

    fn rate(per_second: u32, burst: u32) -> Option<Rate> {
        Some(Rate {
            per_second: NonZeroU32::new(per_second).expect("rate"),
            burst: NonZeroU32::new(burst).expect("burst"),
        })
    }

    #[test]
    fn rate_limits_are_off_by_default_and_bursts_default_to_the_rate() {
        assert_eq!(parse(GOOD).expect("valid").websocket.rate_limits, None);
        let text = GOOD.to_owned()
            + "[websocket]\nclient_messages_per_second = 20\nclient_message_burst = 5\nclient_bytes_per_second = 0\nper_client_bytes_per_second = 65536\nrate_limit_action = \"throttle\"\n";
        let limits = parse(&text).expect("valid").websocket.rate_limits;
        assert_eq!(
            limits,
            Some(RateLimits {
                messages: rate(20, 5),
                bytes: None,
                per_client_messages: None,
                per_client_bytes: rate(65536, 65536),
                action: RateLimitAction::Throttle,
            })
        );
        // A burst of 0 is the default, the rate (as the commented keys in gateway.toml say).
        let text = GOOD.to_owned()
            + "[websocket]\nclient_message_burst = 0\nclient_bytes_per_second = 100\nclient_bytes_burst = 0\n";
        let limits = parse(&text).expect("valid").websocket.rate_limits;
        assert_eq!(limits.clone().and_then(|l| l.bytes), rate(100, 100));
        assert_eq!(limits.and_then(|l| l.messages), None);
        // An action alone limits nothing; `close` is the default action.
        let text = GOOD.to_owned() + "[websocket]\nrate_limit_action = \"throttle\"\n";
        assert_eq!(parse(&text).expect("valid").websocket.rate_limits, None);
        let text = GOOD.to_owned() + "[websocket]\nper_client_messages_per_second = 3\n";
        let limits = parse(&text).expect("valid").websocket.rate_limits;
        assert_eq!(limits.map(|l| l.action), Some(RateLimitAction::Close));
    }

    #[test]
    fn rate_limit_values_are_checked_where_they_stand() {
        let with = |lines: &str| error_of(&format!("{GOOD}[websocket]\n{lines}\n"));
        let err = with("client_messages_per_second = -1");
        assert!(
            err.starts_with("gateway.toml:25:30: `client_messages_per_second` is a whole number up to 4294967295, 0 for no limit"),
            "{err}"
        );
        let err = with("client_bytes_per_second = 5000000000");
        assert!(
            err.contains("`client_bytes_per_second` is a whole number up to"),
            "{err}"
        );
        let err = with("client_messages_per_second = 5\nclient_message_burst = -5");
        assert!(
            err.starts_with(
                "gateway.toml:26:24: `client_message_burst` is a whole number up to 4294967295"
            ),
            "{err}"
        );
        let err = with("per_client_bytes_burst = 100");
        assert!(
            err.starts_with(
                "gateway.toml:25:26: `per_client_bytes_burst` needs `per_client_bytes_per_second`"
            ),
            "{err}"
        );
        let err = with("rate_limit_action = \"drop\"");
        assert!(
            err.starts_with("gateway.toml:25:21: `rate_limit_action` is \"close\" or \"throttle\""),
            "{err}"
        );
        let err = with("client_messages_per_second = \"20\"");
        assert!(err.contains("invalid type"), "{err}");
    }

    /// A route can turn an inherited limit off with 0 (its burst then does not matter); an
    /// agent's own table lies over its route's; agents without one share the route's settings.
    #[test]
    fn routes_and_agents_override_rate_limits() {
        let text = GOOD
            .replacen(
                "[[routes.agents]]",
                "[routes.websocket]\nclient_messages_per_second = 0\nclient_bytes_per_second = 1000\n\n[[routes.agents]]",
                1,
            )
            .replace(
                "slug = \"chat-v2\"\n",
                "slug = \"chat-v2\"\n[routes.agents.websocket]\nclient_bytes_burst = 4000\nrate_limit_action = \"throttle\"\nping_interval = \"5s\"\n",
            )
            + "[websocket]\nclient_messages_per_second = 10\nclient_message_burst = 2\n";
        let config = parse(&text).expect("valid");
        assert_eq!(
            config
                .websocket
                .rate_limits
                .as_ref()
                .and_then(|l| l.messages),
            rate(10, 2)
        );
        let route = &config.routes[0];
        let coder = &route.agents["coderagent"];
        let chat = &route.agents["chat"];
        assert!(std::sync::Arc::ptr_eq(&coder.websocket, &route.websocket));
        assert!(!coder.own_websocket && chat.own_websocket);
        let route_limits = route.websocket.rate_limits.clone().expect("limits");
        assert_eq!(route_limits.messages, None);
        assert_eq!(route_limits.bytes, rate(1000, 1000));
        assert_eq!(route_limits.action, RateLimitAction::Close);
        let chat_limits = chat.websocket.rate_limits.clone().expect("limits");
        assert_eq!(chat_limits.bytes, rate(1000, 4000));
        assert_eq!(chat_limits.action, RateLimitAction::Throttle);
        assert_eq!(
            chat.websocket.client_heartbeat.map(|h| h.interval),
            Some(secs(5))
        );
        let err = error_of(&GOOD.replace(
            "slug = \"chat-v2\"\n",
            "slug = \"chat-v2\"\n[routes.agents.websocket]\nclient_message_bust = 4\n",
        ));
        assert!(err.contains("unknown field `client_message_bust`"), "{err}");
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
