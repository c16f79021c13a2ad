//! ParameterStatus after a RESET, for a client that is not pinned. The RESET
//! runs on a server connection whose own defaults are the server's, and the
//! server reports those (`application_name` is dbproxy's login name); but the
//! client's startup values apply again from its next request (carried to the
//! server connection it gets), as RESET gives them on a direct connection.
//! So the ReadyForQuery that confirms a RESET (`RESET name`, `RESET ALL`,
//! `SET name TO DEFAULT`, or a `DISCARD ALL` sent to a server) is preceded by
//! the client's own startup values of the parameters it resets that servers
//! report: its driver keeps them, not the server's. A `DISCARD ALL` that
//! dbproxy answers itself tells the client the values it returns to of
//! every such parameter it changes.

use bytes::BytesMut;

use crate::protocol::backend::parameter_status;
use crate::server_conn::ServerParams;
use crate::server_state::Settings;
use crate::sql::SettingChange;

#[derive(Debug, Default)]
pub(super) struct Restate {
    /// The client's startup values (its parameters, `options` items, an
    /// empty `application_name` if neither names one) of the parameters
    /// servers report, under the servers' spelling.
    own: Box<[(Box<str>, Box<str>)]>,
    /// What the servers reported at login (shared by the pool's clients).
    server: ServerParams,
}

impl Restate {
    /// From the client's startup values (`greeting::startup_values`) and
    /// what the servers reported at login.
    pub(super) fn new(startup: &[(String, String)], server: ServerParams) -> Restate {
        let mut own: Vec<(Box<str>, Box<str>)> = Vec::new();
        for (name, value) in startup {
            let Some((reported, _)) = server.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) else {
                continue;
            };
            // (A later value of the same name replaces an earlier one.)
            own.retain(|(n, _)| **n != **reported);
            own.push((reported.as_str().into(), value.as_str().into()));
        }
        Restate {
            own: own.into(),
            server,
        }
    }

    /// A ReadyForQuery outside a transaction block, which `confirmed` the
    /// client's setting changes, is about to be forwarded after `before`
    /// (the messages ahead of it not yet forwarded). When `restate` (the
    /// client is not pinned, in transaction mode), each parameter with a
    /// startup value whose last change among them was a RESET is told that
    /// value: `before`, then those ParameterStatus messages, go to
    /// `to_client`. Returns whether anything went.
    pub(super) fn before_ready(
        &self,
        confirmed: &[SettingChange],
        restate: bool,
        before: &[u8],
        to_client: &mut BytesMut,
    ) -> bool {
        if !restate || confirmed.is_empty() {
            return false;
        }
        let mut told = self.own.iter().filter(|(name, _)| {
            let last = confirmed.iter().rev().find(|change| match change {
                SettingChange::Set { name: n, .. } | SettingChange::Reset(n) => n.eq_ignore_ascii_case(name),
                SettingChange::ResetAll => true,
            });
            matches!(last, Some(SettingChange::Reset(_) | SettingChange::ResetAll))
        });
        let Some((name, value)) = told.next() else {
            return false;
        };
        to_client.extend_from_slice(before);
        parameter_status(to_client, name, value);
        for (name, value) in told {
            parameter_status(to_client, name, value);
        }
        true
    }

    /// A `DISCARD ALL` answered by dbproxy takes the client from `before`
    /// to `startup`: tells it the value it now has of each reported
    /// parameter whose value changes.
    pub(super) fn discard_locally(&self, before: &Settings, startup: &Settings, out: &mut BytesMut) {
        for (name, server_value) in self.server.iter() {
            if before.same_value(startup, &name.to_ascii_lowercase()) {
                continue;
            }
            // Its startup value, else the server's default.
            parameter_status(out, name, self.own_value(name).unwrap_or(server_value));
        }
    }

    fn own_value(&self, name: &str) -> Option<&str> {
        self.own.iter().find(|(n, _)| **n == *name).map(|(_, v)| &**v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, value: &str) -> Vec<u8> {
        let mut out = BytesMut::new();
        parameter_status(&mut out, name, value);
        out.to_vec()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn server() -> ServerParams {
        let list = [
            ("TimeZone", "Europe/Berlin"),
            ("DateStyle", "ISO, MDY"),
            ("application_name", "dbproxy"),
        ];
        std::sync::Arc::new(pairs(&list))
    }

    #[test]
    fn a_reset_parameter_is_restated_unless_set_after() {
        let startup = [("application_name", ""), ("timezone", "UTC"), ("work_mem", "8MB")];
        let r = Restate::new(&pairs(&startup), server());
        let reset = |name: &str| SettingChange::Reset(name.into());
        let set = SettingChange::Set {
            name: "timezone".into(),
            sql: String::new(),
        };
        let mut out = BytesMut::new();
        assert!(r.before_ready(&[SettingChange::ResetAll], true, &[], &mut out));
        let want = [status("application_name", ""), status("TimeZone", "UTC")].concat();
        assert_eq!(
            &out[..],
            &want[..],
            "DateStyle and work_mem: no value of its own, not reported"
        );
        out.clear();
        assert!(!r.before_ready(&[reset("timezone"), set.clone()], true, &[], &mut out));
        assert!(!r.before_ready(&[reset("timezone")], false, &[], &mut out), "pinned");
        assert!(!r.before_ready(&[reset("datestyle")], true, &[], &mut out));
        assert!(r.before_ready(&[set, reset("TimeZone")], true, &[], &mut out));
        assert_eq!(&out[..], &status("TimeZone", "UTC")[..]);
    }

    #[test]
    fn a_local_discard_all_tells_what_login_showed_for_what_changed() {
        let startup = pairs(&[("application_name", ""), ("application_name", "app")]);
        let r = Restate::new(&startup, server());
        let settings = |list: &[(&str, &str)]| Settings::from_values(list.iter().copied());
        let before = settings(&[("application_name", "x"), ("timezone", "UTC")]);
        let mut out = BytesMut::new();
        r.discard_locally(&before, &settings(&[("application_name", "app")]), &mut out);
        let want = [status("TimeZone", "Europe/Berlin"), status("application_name", "app")].concat();
        assert_eq!(&out[..], &want[..]);
    }
}
