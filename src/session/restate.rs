//! ParameterStatus after a RESET, for a client that is not pinned. The RESET
//! runs on a server connection whose own defaults are the server's, and the
//! server reports those (`application_name` is dbproxy's login name); but the
//! client's startup values apply again from its next request (carried to the
//! server connection it gets), as RESET gives them on a direct connection.
//! So the ReadyForQuery that confirms the RESET is preceded by the client's
//! own values of the parameters the server reported since its transaction
//! began: its driver keeps them, not the server's. The same after a `DISCARD
//! ALL` that went to a server; one that dbproxy answers itself tells the
//! client what it was shown at login for every parameter it had changed.

use bytes::BytesMut;

use crate::protocol::backend::parameter_status;
use crate::server_conn::ServerParams;
use crate::server_state::Settings;
use crate::sql::SettingChange;

/// What the client was shown at login for the parameters it sent itself
/// (not items of `options`), and an empty `application_name` if it sent
/// none: what a RESET of them returns to.
#[derive(Debug, Default)]
pub(super) struct Restate {
    own: Box<[(Box<str>, Box<str>)]>,
    /// What the servers reported at login (shared by the pool's clients).
    server: ServerParams,
    /// Parameters the server reported to the client since its last
    /// ReadyForQuery outside a transaction block.
    reported: Vec<Box<str>>,
    /// A `DISCARD ALL` went to the server since then.
    discarded: bool,
}

impl Restate {
    /// From the startup packet's parameters and the servers' (shown at login).
    pub(super) fn new(params: &[(String, String)], server: ServerParams) -> Restate {
        let mut own: Vec<(Box<str>, Box<str>)> = params
            .iter()
            .filter(|(name, _)| !matches!(name.as_str(), "user" | "database" | "replication" | "options"))
            .map(|(name, value)| (name.as_str().into(), value.as_str().into()))
            .collect();
        if !own
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("application_name"))
        {
            own.push(("application_name".into(), "".into()));
        }
        Restate {
            own: own.into(),
            server,
            reported: Vec::new(),
            discarded: false,
        }
    }

    /// A `DISCARD ALL` was sent to the server connection.
    pub(super) fn discarded(&mut self) {
        self.discarded = true;
    }

    /// A `DISCARD ALL` answered by dbproxy takes the client from `before`
    /// to `startup`: tells it what it was shown at login for each reported
    /// parameter whose value changes.
    pub(super) fn discard_locally(&self, before: &Settings, startup: &Settings, out: &mut BytesMut) {
        for (name, server_value) in self.server.iter() {
            if before.same_value(startup, &name.to_ascii_lowercase()) {
                continue;
            }
            let value = self.own_value(name).unwrap_or(server_value);
            parameter_status(out, name, value);
        }
    }

    fn own_value(&self, name: &str) -> Option<&str> {
        self.own
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| &**v)
    }

    /// A ParameterStatus (its body) went to the client.
    pub(super) fn reported(&mut self, body: &[u8]) {
        let name = body.split(|&b| b == 0).next().unwrap_or_default();
        if let Ok(name) = std::str::from_utf8(name)
            && !self.reported.iter().any(|n| **n == *name)
        {
            self.reported.push(name.into());
        }
    }

    /// [`Self::ready`] for a ReadyForQuery about to be forwarded after
    /// `before` (the messages ahead of it not yet forwarded): whatever is
    /// told goes to `to_client` after `before`. Returns whether `before` went.
    pub(super) fn before_ready(
        &mut self,
        confirmed: &[SettingChange],
        restate: bool,
        before: &[u8],
        to_client: &mut BytesMut,
    ) -> bool {
        let mut told = BytesMut::new();
        if !self.ready(confirmed, restate, &mut told) {
            return false;
        }
        to_client.extend_from_slice(before);
        to_client.extend_from_slice(&told);
        true
    }

    /// A ReadyForQuery outside a transaction block, which `confirmed` the
    /// client's setting changes. For each parameter the server reported
    /// whose last change among them was a RESET, and which the client has a
    /// value of its own for, writes that value in a ParameterStatus to
    /// `out` (where the ReadyForQuery goes next), when `restate` (the
    /// client is not pinned, in transaction mode). Returns whether it wrote.
    pub(super) fn ready(&mut self, confirmed: &[SettingChange], restate: bool, out: &mut BytesMut) -> bool {
        if self.reported.is_empty() {
            self.discarded = false;
            return false;
        }
        let discarded = std::mem::take(&mut self.discarded);
        let mut wrote = false;
        for name in std::mem::take(&mut self.reported) {
            let last = confirmed.iter().rev().find(|change| match change {
                SettingChange::Set { name: n, .. } | SettingChange::Reset(n) => n.eq_ignore_ascii_case(&name),
                SettingChange::ResetAll => true,
            });
            let reset = match last {
                Some(SettingChange::Set { .. }) => false,
                Some(_) => true,
                // (A DISCARD ALL is not among the changes; one after it would be.)
                None => discarded,
            };
            if !restate || !reset {
                continue;
            }
            if let Some(value) = self.own_value(&name) {
                parameter_status(out, &name, value);
                wrote = true;
            }
        }
        wrote
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

    #[test]
    fn a_reset_parameter_the_server_reported_is_restated_unless_set_after() {
        let params = [("user", "u"), ("TimeZone", "UTC"), ("options", "-c x=y")];
        let params: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut r = Restate::new(&params, Default::default());
        let body = |name: &str| format!("{name}\0server-value\0").into_bytes();
        let mut out = BytesMut::new();
        r.reported(&body("TimeZone"));
        r.reported(&body("application_name"));
        r.reported(&body("DateStyle"));
        assert!(r.ready(&[SettingChange::ResetAll], true, &mut out));
        let want = [status("TimeZone", "UTC"), status("application_name", "")].concat();
        assert_eq!(&out[..], &want[..], "DateStyle: not the client's own");
        assert!(!r.ready(&[SettingChange::ResetAll], true, &mut out), "told once");

        let set = SettingChange::Set {
            name: "timezone".into(),
            sql: String::new(),
        };
        r.reported(&body("TimeZone"));
        assert!(!r.ready(&[SettingChange::Reset("timezone".into()), set.clone()], true, &mut out));
        r.reported(&body("TimeZone"));
        assert!(
            !r.ready(&[SettingChange::Reset("timezone".into())], false, &mut out),
            "pinned"
        );
        r.reported(&body("TimeZone"));
        assert!(r.ready(&[set.clone(), SettingChange::Reset("timezone".into())], true, &mut out));

        // DISCARD ALL sent to the server, then maybe a SET.
        r.discarded();
        r.reported(&body("TimeZone"));
        assert!(r.ready(&[], true, &mut out));
        r.discarded();
        r.reported(&body("TimeZone"));
        assert!(!r.ready(&[set], true, &mut out));
    }

    #[test]
    fn a_local_discard_all_tells_what_login_showed_for_what_changed() {
        let params = vec![("application_name".to_owned(), "app".to_owned())];
        let server: Vec<(String, String)> = [
            ("TimeZone", "Europe/Berlin"),
            ("DateStyle", "ISO, MDY"),
            ("application_name", "dbproxy"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let r = Restate::new(&params, std::sync::Arc::new(server));
        let startup = crate::server_state::Settings::from_values([("application_name", "app")]);
        let before = crate::server_state::Settings::from_values([("application_name", "x"), ("timezone", "UTC")]);
        let mut out = BytesMut::new();
        r.discard_locally(&before, &startup, &mut out);
        let want = [status("TimeZone", "Europe/Berlin"), status("application_name", "app")].concat();
        assert_eq!(&out[..], &want[..]);
    }
}
