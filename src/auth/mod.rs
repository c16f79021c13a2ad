//! Authentication: verifying clients (SCRAM-SHA-256) against `[[users]]`, and
//! the SCRAM client `server_conn` logs in to servers with, which keeps each
//! pool's salted password so that only its first login pays for PBKDF2.

pub mod scram;
pub mod scram_client;

pub use scram::{ScramError, ScramExchange, ScramSecret};
pub use scram_client::{SaltedPasswordCache, ScramClient};

/// A configured user, with its password prepared once for client verification.
/// `Debug` never prints the password.
pub struct User {
    /// Name clients log in as, and the role used on the servers.
    pub name: String,
    /// What client proofs are checked against.
    pub secret: ScramSecret,
    /// Password the proxy uses to log in to the servers as this user.
    pub server_password: String,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User").field("name", &self.name).finish_non_exhaustive()
    }
}

impl User {
    /// Prepares a user from its configured password: a plaintext password or a
    /// `SCRAM-SHA-256$...` verifier (then `server_password` must be given).
    pub fn new(name: &str, password: &str, server_password: Option<&str>) -> Self {
        let secret = ScramSecret::parse_verifier(password).unwrap_or_else(|| ScramSecret::from_password(password));
        User {
            name: name.to_owned(),
            secret,
            server_password: server_password.unwrap_or(password).to_owned(),
        }
    }
}
