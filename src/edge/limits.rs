//! Edge limits: WebSocket upgrades per client IP per second, open WebSockets per client IP
//! and in total, request header size and declared body size. Each refusal has its own status
//! and JSON body, and is counted.

use pingora::http::RequestHeader;
use pingora_limits::rate::Rate;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The configured limits; `None` means unlimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LimitSettings {
    pub(crate) upgrades_per_ip_per_second: Option<u32>,
    pub(crate) websockets_per_ip: Option<usize>,
    pub(crate) websockets_total: Option<usize>,
    pub(crate) max_request_header_bytes: usize,
    pub(crate) max_request_body_bytes: Option<u64>,
    /// How long a connection's first request head may take to arrive (slowloris).
    pub(crate) header_timeout: Option<Duration>,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            upgrades_per_ip_per_second: Some(50),
            websockets_per_ip: Some(256),
            websockets_total: Some(9000),
            max_request_header_bytes: 32 * 1024,
            max_request_body_bytes: Some(8 * 1024 * 1024),
            header_timeout: Some(Duration::from_secs(10)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitRefusal {
    UpgradeRate,
    WebSocketsPerIp,
    WebSocketsTotal,
    HeaderTooLarge,
    BodyTooLarge,
    /// An authenticated subject's upgrades per second (its policy's limit).
    UpgradeRatePerSubject,
    /// An authenticated subject's open WebSockets (its policy's limit).
    WebSocketsPerSubject,
}

impl LimitRefusal {
    pub(crate) fn status(self) -> u16 {
        match self {
            LimitRefusal::UpgradeRate
            | LimitRefusal::WebSocketsPerIp
            | LimitRefusal::UpgradeRatePerSubject
            | LimitRefusal::WebSocketsPerSubject => 429,
            LimitRefusal::WebSocketsTotal => 503,
            LimitRefusal::HeaderTooLarge => 431,
            LimitRefusal::BodyTooLarge => 413,
        }
    }

    /// The `limit` label and the JSON `error`.
    pub(crate) fn kind(self) -> &'static str {
        match self {
            LimitRefusal::UpgradeRate => "upgrade_rate",
            LimitRefusal::WebSocketsPerIp => "websockets_per_ip",
            LimitRefusal::WebSocketsTotal => "websockets_total",
            LimitRefusal::HeaderTooLarge => "request_header_too_large",
            LimitRefusal::BodyTooLarge => "request_body_too_large",
            LimitRefusal::UpgradeRatePerSubject => "upgrade_rate_per_subject",
            LimitRefusal::WebSocketsPerSubject => "websockets_per_subject",
        }
    }
}

/// Counters that outlive reloads; the limits themselves come from the configuration in force.
pub(crate) struct LimitState {
    upgrades: Rate,
    open_per_ip: Mutex<HashMap<IpAddr, usize>>,
    open_total: AtomicUsize,
    /// By subject key (policy and subject: two policies' subjects are different people).
    subject_upgrades: Rate,
    open_per_subject: Mutex<HashMap<String, usize>>,
}

impl Default for LimitState {
    fn default() -> Self {
        LimitState {
            upgrades: Rate::new(Duration::from_secs(1)),
            open_per_ip: Mutex::new(HashMap::new()),
            open_total: AtomicUsize::new(0),
            subject_upgrades: Rate::new(Duration::from_secs(1)),
            open_per_subject: Mutex::new(HashMap::new()),
        }
    }
}

/// An open WebSocket's place in the counts, given back when dropped. It owns its share of
/// the state because it lives in the connection's own task, past the request that made it.
pub(crate) struct WebSocketSlot {
    state: Arc<LimitState>,
    ip: Option<IpAddr>,
}

impl Drop for WebSocketSlot {
    fn drop(&mut self) {
        self.state.open_total.fetch_sub(1, Ordering::AcqRel);
        if let (Some(ip), Ok(mut per_ip)) = (self.ip, self.state.open_per_ip.lock()) {
            if let Some(count) = per_ip.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

impl LimitState {
    /// Admits a WebSocket upgrade from `ip`, or says which limit refuses it.
    pub(crate) fn admit_websocket(
        self: &Arc<Self>,
        settings: &LimitSettings,
        ip: Option<IpAddr>,
    ) -> Result<WebSocketSlot, LimitRefusal> {
        if let (Some(per_second), Some(ip)) = (settings.upgrades_per_ip_per_second, ip) {
            let allowed = isize::try_from(per_second).unwrap_or(isize::MAX);
            if self.upgrades.observe(&ip, 1) > allowed {
                return Err(LimitRefusal::UpgradeRate);
            }
        }
        let mut per_ip = self
            .open_per_ip
            .lock()
            .map_err(|_| LimitRefusal::WebSocketsTotal)?;
        if settings
            .websockets_total
            .is_some_and(|max| self.open_total.load(Ordering::Acquire) >= max)
        {
            return Err(LimitRefusal::WebSocketsTotal);
        }
        if let (Some(max), Some(ip)) = (settings.websockets_per_ip, ip) {
            if per_ip.get(&ip).copied().unwrap_or(0) >= max {
                return Err(LimitRefusal::WebSocketsPerIp);
            }
        }
        if let Some(ip) = ip {
            *per_ip.entry(ip).or_default() += 1;
        }
        self.open_total.fetch_add(1, Ordering::AcqRel);
        Ok(WebSocketSlot {
            state: Arc::clone(self),
            ip,
        })
    }
}

/// The per-subject limits of an authentication policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SubjectLimits {
    pub(crate) upgrades_per_second: Option<u32>,
    pub(crate) open_websockets: Option<usize>,
}

/// An authenticated subject's open WebSocket, given back when dropped.
pub(crate) struct SubjectSlot {
    state: Arc<LimitState>,
    key: String,
}

impl Drop for SubjectSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.state.open_per_subject.lock() {
            if let Some(count) = open.get_mut(&self.key) {
                *count -= 1;
                if *count == 0 {
                    open.remove(&self.key);
                }
            }
        }
    }
}

impl LimitState {
    /// Admits an upgrade by the subject `key`, beside the per-address limits.
    pub(crate) fn admit_subject(
        self: &Arc<Self>,
        limits: SubjectLimits,
        key: String,
    ) -> Result<SubjectSlot, LimitRefusal> {
        if let Some(per_second) = limits.upgrades_per_second {
            let allowed = isize::try_from(per_second).unwrap_or(isize::MAX);
            if self.subject_upgrades.observe(&key, 1) > allowed {
                return Err(LimitRefusal::UpgradeRatePerSubject);
            }
        }
        let mut open = self
            .open_per_subject
            .lock()
            .map_err(|_| LimitRefusal::WebSocketsPerSubject)?;
        let count = open.entry(key.clone()).or_default();
        if limits.open_websockets.is_some_and(|max| *count >= max) {
            if *count == 0 {
                open.remove(&key);
            }
            return Err(LimitRefusal::WebSocketsPerSubject);
        }
        *count += 1;
        Ok(SubjectSlot {
            state: Arc::clone(self),
            key,
        })
    }
}

/// Checks a request's header size and declared body size.
pub(crate) fn check_request(
    settings: &LimitSettings,
    req: &RequestHeader,
) -> Result<(), LimitRefusal> {
    let header_bytes: usize = req
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + req.uri.scheme_str().map_or(0, |s| s.len() + 3)
        + req.uri.authority().map_or(0, |a| a.as_str().len())
        + req.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if header_bytes > settings.max_request_header_bytes {
        return Err(LimitRefusal::HeaderTooLarge);
    }
    let declared = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let (Some(max), Some(len)) = (settings.max_request_body_bytes, declared) {
        if len > max {
            return Err(LimitRefusal::BodyTooLarge);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn websocket_counts_per_ip_and_total() {
        let settings = LimitSettings {
            upgrades_per_ip_per_second: None,
            websockets_per_ip: Some(2),
            websockets_total: Some(3),
            ..LimitSettings::default()
        };
        let state = Arc::new(LimitState::default());
        let a = Some(ip("192.0.2.1"));
        let b = Some(ip("192.0.2.2"));
        let first = state.admit_websocket(&settings, a).expect("1");
        let _second = state.admit_websocket(&settings, a).expect("2");
        assert_eq!(
            state.admit_websocket(&settings, a).err(),
            Some(LimitRefusal::WebSocketsPerIp)
        );
        let _third = state.admit_websocket(&settings, b).expect("3");
        assert_eq!(
            state.admit_websocket(&settings, b).err(),
            Some(LimitRefusal::WebSocketsTotal)
        );
        drop(first);
        assert!(state.admit_websocket(&settings, a).is_ok());
    }

    #[test]
    fn subjects_are_counted_apart_from_addresses_and_from_each_other() {
        let state = Arc::new(LimitState::default());
        let limits = SubjectLimits {
            upgrades_per_second: None,
            open_websockets: Some(2),
        };
        let first = state.admit_subject(limits, "p\0alice".into()).expect("1");
        let _second = state.admit_subject(limits, "p\0alice".into()).expect("2");
        assert_eq!(
            state.admit_subject(limits, "p\0alice".into()).err(),
            Some(LimitRefusal::WebSocketsPerSubject)
        );
        assert!(state.admit_subject(limits, "p\0bob".into()).is_ok());
        drop(first);
        assert!(state.admit_subject(limits, "p\0alice".into()).is_ok());
        let rate = SubjectLimits {
            upgrades_per_second: Some(3),
            open_websockets: None,
        };
        let refused = (0..10)
            .filter(|_| state.admit_subject(rate, "q\0carol".into()).is_err())
            .count();
        assert!(refused >= 6, "{refused} refused");
    }

    #[test]
    fn upgrade_rate() {
        let settings = LimitSettings {
            upgrades_per_ip_per_second: Some(3),
            ..LimitSettings::default()
        };
        let state = Arc::new(LimitState::default());
        let refused = (0..10)
            .filter(|_| {
                state
                    .admit_websocket(&settings, Some(ip("192.0.2.3")))
                    .is_err()
            })
            .count();
        assert!(refused >= 6, "{refused} refused");
    }
}
