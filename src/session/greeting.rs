//! What a client is told and given at login: the ParameterStatus set (from
//! the servers, without needing one up at that moment once one was ever
//! reached) and the session settings its startup packet asks for.

use std::sync::Arc;

use crate::pool::Pool;
use crate::proxy::Shared;
use crate::server_conn::ServerParams;
use crate::server_state::Settings;

/// The settings of [`startup_values`].
pub(super) fn startup_settings(values: &[(String, String)]) -> Settings {
    Settings::from_values(values.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

/// The settings a client's startup packet asks for, as plain values: every
/// parameter except the ones that name the connection, plus `-c name=value`
/// items of `options` (a later value of a name replaces an earlier one).
pub(super) fn startup_values(params: &[(String, String)]) -> Vec<(String, String)> {
    // Servers log in without one; a client that sent none sees an empty one, as on a direct connection.
    let mut pairs: Vec<(String, String)> = vec![("application_name".to_owned(), String::new())];
    for (name, value) in params {
        match name.as_str() {
            "user" | "database" | "replication" => {}
            "options" => pairs.extend(parse_options(value)),
            _ => {
                pairs.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
                pairs.push((name.clone(), value.clone()));
            }
        }
    }
    pairs
}

/// `-c name=value` and `--name=value` items of the `options` startup
/// parameter (backslash escapes a space), as PostgreSQL reads them.
fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let item = if w == "-c" {
            words.next()
        } else {
            w.strip_prefix("-c").or_else(|| w.strip_prefix("--")).map(str::to_owned)
        };
        if let Some((name, value)) = item.as_deref().and_then(|i| i.split_once('=')) {
            out.push((name.replace('-', "_"), value.to_owned()));
        }
    }
    out
}

/// The ParameterStatus set shown at login: what the servers last reported,
/// without needing a server at this moment once one was ever reached.
pub(super) async fn server_params(shared: &Shared, pools: &[&Arc<Pool>]) -> ServerParams {
    if let Some(p) = pools.iter().find_map(|p| p.server_params()) {
        return p;
    }
    let mut last_error = None;
    for pool in pools {
        match pool.checkout(shared.live().config.pool.checkout_timeout).await {
            Ok(conn) => {
                let params = conn.conn.params.clone();
                conn.checkin();
                return params;
            }
            Err(e) => last_error = Some(e),
        }
    }
    match last_error {
        None => default_params(),
        Some(e) => {
            tracing::warn!(error = %e, "no server reachable at login; reporting default parameters");
            default_params()
        }
    }
}

/// What a client is told at login when no server was ever reachable.
fn default_params() -> ServerParams {
    Arc::new(
        [
            ("server_version", "15.0"),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("IntervalStyle", "postgres"),
            ("TimeZone", "UTC"),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
            ("application_name", ""),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_options_become_settings() {
        let got = parse_options("-c statement_timeout=5s --search-path=a,b -cwork_mem=8MB -c x=a\\ b");
        let want = [
            ("statement_timeout", "5s"),
            ("search_path", "a,b"),
            ("work_mem", "8MB"),
            ("x", "a b"),
        ];
        assert_eq!(got, want.map(|(k, v)| (k.to_owned(), v.to_owned())));
    }
}
