//! A client's named prepared statements in transaction pooling: its names
//! mapped to shared server-side statements, with what they cost in memory so
//! that one client cannot grow the proxy without bound
//! (`pool.max_client_statement_bytes`).

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::expect::ClientParse;
use crate::router::Class;
use crate::sql::Effects;

/// A client's named prepared statement.
#[derive(Debug, Clone)]
pub struct Statement {
    /// The name used on servers: the same for the same text and types, so
    /// clients share server-side statements.
    pub server_name: Arc<str>,
    pub query: Box<str>,
    pub param_types: Box<[u8]>,
    /// What running it does to the session.
    pub effects: Effects,
    /// Where it may run.
    pub class: Class,
}

/// The server-side name of a statement: a digest of its text, its types and
/// the database's schema epoch (see `Router::schema_epoch`).
pub(super) fn server_name(query: &str, param_types: &[u8], epoch: u64) -> Arc<str> {
    let mut h = Sha256::new();
    h.update(query.as_bytes());
    h.update([0]);
    h.update(param_types);
    h.update(epoch.to_le_bytes());
    let digest = h.finalize();
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    Arc::from(format!("dbp_{hex}"))
}

/// Bytes a statement costs beyond its name, text and types: the map entry,
/// the statement itself, its server-side name and its effects.
pub const OVERHEAD: usize = 256;

/// What keeping statement `name` with this text and these types costs.
pub fn cost(name: &str, query: &str, param_types: &[u8]) -> usize {
    OVERHEAD + name.len() + query.len() + param_types.len()
}

/// The client's statements by its names, and their total [`cost`]. SipHash,
/// not a faster hash: the names are the client's to choose.
#[derive(Debug, Default)]
pub struct Statements {
    /// Each with the id its Parse was given.
    map: HashMap<Arc<str>, (Arc<Statement>, u64)>,
    bytes: usize,
    next_id: u64,
    /// A Parse was refused for the budget (warned about once per client).
    refused: bool,
}

impl Statements {
    pub fn get(&self, name: &str) -> Option<&Arc<Statement>> {
        self.map.get(name).map(|(s, _)| s)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// Whether this is the first Parse refused for the budget.
    pub fn first_refusal(&mut self) -> bool {
        !std::mem::replace(&mut self.refused, true)
    }

    /// Total cost of the statements kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Keeps `stmt` under `name`, replacing any statement of that name.
    /// Returns the Parse's id, for [`Self::forget`].
    pub fn insert(&mut self, name: &str, stmt: Arc<Statement>) -> ClientParse {
        self.next_id += 1;
        self.bytes += cost(name, &stmt.query, &stmt.param_types);
        let name: Arc<str> = name.into();
        if let Some((old, _)) = self.map.insert(name.clone(), (stmt, self.next_id)) {
            self.bytes -= cost(&name, &old.query, &old.param_types);
        }
        ClientParse { name, id: self.next_id }
    }

    pub fn remove(&mut self, name: &str) -> Option<Arc<Statement>> {
        let (old, _) = self.map.remove(name)?;
        self.bytes -= cost(name, &old.query, &old.param_types);
        Some(old)
    }

    /// Removes the statement `parse` created, unless its name has been given
    /// to another since: that Parse got no ParseComplete after all.
    pub fn forget(&mut self, parse: &ClientParse) {
        if self.map.get(&*parse.name).is_some_and(|(_, id)| *id == parse.id) {
            self.remove(&parse.name);
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<Statement>> {
        self.map.values().map(|(s, _)| s)
    }

    /// The statements, to give them new server-side names (their cost stays).
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Arc<Statement>> {
        self.map.values_mut().map(|(s, _)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_depend_on_text_and_types() {
        let a = server_name("SELECT $1", &[0, 1, 0, 0, 0, 23], 0);
        assert_eq!(a, server_name("SELECT $1", &[0, 1, 0, 0, 0, 23], 0));
        assert_ne!(a, server_name("SELECT $1", &[0, 1, 0, 0, 0, 25], 0));
        assert_ne!(a, server_name("SELECT $2", &[0, 1, 0, 0, 0, 23], 0));
        assert_ne!(a, server_name("SELECT $1", &[0, 1, 0, 0, 0, 23], 1));
        assert!(a.starts_with("dbp_") && a.len() == 28);
    }

    fn stmt(query: &str) -> Arc<Statement> {
        Arc::new(Statement {
            server_name: server_name(query, &[0, 0], 0),
            query: query.into(),
            param_types: Box::new([0, 0]),
            effects: Effects::default(),
            class: Class::Neutral,
        })
    }

    #[test]
    fn the_cost_follows_every_change() {
        let mut s = Statements::default();
        s.insert("a", stmt("SELECT 1"));
        s.insert("bb", stmt("SELECT 22"));
        assert_eq!(
            s.bytes(),
            cost("a", "SELECT 1", &[0, 0]) + cost("bb", "SELECT 22", &[0, 0])
        );
        // Replacing a name counts the new statement only.
        s.insert("a", stmt("SELECT 333"));
        assert_eq!(
            s.bytes(),
            cost("a", "SELECT 333", &[0, 0]) + cost("bb", "SELECT 22", &[0, 0])
        );
        assert!(s.remove("a").is_some());
        assert!(s.remove("a").is_none());
        assert_eq!(s.bytes(), cost("bb", "SELECT 22", &[0, 0]));
        s.clear();
        assert_eq!((s.bytes(), s.contains("bb")), (0, false));
    }

    #[test]
    fn a_failed_parse_forgets_only_its_own_statement() {
        let mut s = Statements::default();
        let first = s.insert("a", stmt("SELECT 1"));
        let second = s.insert("a", stmt("SELECT 2"));
        s.forget(&first);
        assert_eq!(s.get("a").map(|st| &*st.query), Some("SELECT 2"));
        s.forget(&second);
        assert_eq!((s.get("a").is_none(), s.bytes()), (true, 0));
    }
}
