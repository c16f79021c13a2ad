//! Server side of SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL speaks it, without
//! channel binding. The salted password is derived once per user when the
//! configuration is loaded; each login then costs a few HMACs, not 4096.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Name of the mechanism, as offered in AuthenticationSASL.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// PostgreSQL's default iteration count.
const ITERATIONS: u32 = 4096;

/// What the server stores for a user: enough to verify, not to impersonate.
#[derive(Clone)]
pub struct ScramSecret {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramSecret(..)")
    }
}

/// Why a SCRAM exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The client's message does not follow the SCRAM grammar.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// Channel binding was requested; this server does not offer it.
    #[error("channel binding is not supported")]
    ChannelBinding,
    /// The proof does not match: wrong password.
    #[error("invalid SCRAM proof")]
    InvalidProof,
    /// The server's signature does not match: it does not know the password.
    #[error("the server's SCRAM signature is invalid")]
    InvalidServerSignature,
    /// The salted password's derivation did not finish (the runtime is
    /// shutting down).
    #[error("the SCRAM key derivation did not finish")]
    Interrupted,
    /// The server asks for more PBKDF2 iterations than dbproxy will run
    /// (`scram_client::MAX_SERVER_ITERATIONS`).
    #[error("the server asks for {0} SCRAM iterations, more than the 10,000,000 dbproxy runs")]
    TooManyIterations(u32),
    /// The server ended the exchange with an error (`e=`).
    #[error("the server refused the SCRAM exchange: {0}")]
    ServerError(String),
}

pub(super) fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // new_from_slice accepts keys of any length for HMAC.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA-256 with one output block: SCRAM's Hi(). Each round
/// starts from a copy of the keyed HMAC state instead of keying it again,
/// which halves the hashing.
pub(super) fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let keyed = HmacSha256::new_from_slice(password).expect("HMAC takes keys of any length");
    let round = |parts: &[&[u8]]| -> [u8; 32] {
        let mut mac = keyed.clone();
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    };
    let mut u = round(&[salt, &1u32.to_be_bytes()]);
    let mut out = u;
    for _ in 1..iterations {
        u = round(&[&u]);
        out.iter_mut().zip(u.iter()).for_each(|(o, x)| *o ^= x);
    }
    out
}

/// The keys RFC 5802 derives from a salted password.
pub(super) struct Keys {
    pub client: [u8; 32],
    /// H(ClientKey): what the server keeps to check a proof.
    pub stored: [u8; 32],
    pub server: [u8; 32],
}

impl Keys {
    pub(super) fn of(salted: &[u8; 32]) -> Keys {
        let client = hmac(salted, &[b"Client Key"]);
        Keys {
            client,
            stored: Sha256::digest(client).into(),
            server: hmac(salted, &[b"Server Key"]),
        }
    }
}

/// Normalises a password as PostgreSQL does; passwords SASLprep rejects are used as is.
pub(super) fn normalize(password: &str) -> Vec<u8> {
    match stringprep::saslprep(password) {
        Ok(p) => p.as_bytes().to_vec(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

impl ScramSecret {
    /// Derives a secret from a plaintext password with a fresh random salt.
    pub fn from_password(password: &str) -> Self {
        let mut salt = vec![0u8; 16];
        rand::fill(&mut salt[..]);
        Self::derive(password, salt, ITERATIONS)
    }

    fn derive(password: &str, salt: Vec<u8>, iterations: u32) -> Self {
        let keys = Keys::of(&salted_password(&normalize(password), &salt, iterations));
        ScramSecret {
            iterations,
            salt,
            stored_key: keys.stored,
            server_key: keys.server,
        }
    }

    /// Parses a verifier as stored in `pg_authid.rolpassword`:
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse_verifier(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(ScramSecret {
            iterations: iterations.parse().ok().filter(|&i| i > 0)?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }
}

/// Splits `k=value` attributes of a SCRAM message.
pub(super) fn attr(part: Option<&str>, key: char) -> Result<&str, ScramError> {
    let part = part.ok_or(ScramError::Malformed("missing attribute"))?;
    let mut chars = part.chars();
    if chars.next() == Some(key) && chars.next() == Some('=') {
        Ok(&part[2..])
    } else {
        Err(ScramError::Malformed("unexpected attribute"))
    }
}

/// A server-side exchange between the client-first and client-final messages.
pub struct ScramExchange {
    secret: ScramSecret,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ScramExchange {
    /// Handles the client-first message; returns the exchange and the
    /// server-first message to send.
    pub fn start(secret: &ScramSecret, client_first: &[u8]) -> Result<(Self, String), ScramError> {
        let msg = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut parts = msg.splitn(3, ',');
        let cbind = parts.next().unwrap_or_default();
        match cbind {
            "n" | "y" => {}
            s if s.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad channel-binding flag")),
        }
        let authzid = parts.next().ok_or(ScramError::Malformed("missing authzid field"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Malformed("authorization identity is not supported"));
        }
        let bare = parts
            .next()
            .ok_or(ScramError::Malformed("missing client-first-message-bare"))?;
        let mut fields = bare.split(',');
        let first = fields.next();
        if first.is_some_and(|f| f.starts_with("m=")) {
            return Err(ScramError::Malformed("mandatory extensions are not supported"));
        }
        attr(first, 'n')?; // the user name in SCRAM is ignored, as PostgreSQL does
        let client_nonce = attr(fields.next(), 'r')?;
        if client_nonce.is_empty() || !client_nonce.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
            return Err(ScramError::Malformed("invalid client nonce"));
        }
        let mut raw = [0u8; 18];
        rand::fill(&mut raw[..]);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&secret.salt), secret.iterations);
        let exchange = ScramExchange {
            secret: secret.clone(),
            gs2_header: format!("{cbind},{authzid},"),
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok((exchange, server_first))
    }

    /// Verifies the client-final message; returns the server-final message.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let msg = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(ScramError::Malformed("missing proof"))?;
        let mut fields = without_proof.split(',');
        let cbind = attr(fields.next(), 'c')?;
        if B64.decode(cbind).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(ScramError::Malformed("channel-binding data does not match"));
        }
        if attr(fields.next(), 'r')? != self.nonce {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("invalid proof encoding"))?;
        let auth_message = format!("{},{},{}", self.client_first_bare, self.server_first, without_proof);
        let signature = hmac(&self.secret.stored_key, &[auth_message.as_bytes()]);
        let mut client_key = proof;
        client_key.iter_mut().zip(signature.iter()).for_each(|(k, s)| *k ^= s);
        let candidate: [u8; 32] = Sha256::digest(client_key).into();
        if !bool::from(candidate.ct_eq(&self.secret.stored_key)) {
            return Err(ScramError::InvalidProof);
        }
        let server_signature = hmac(&self.secret.server_key, &[auth_message.as_bytes()]);
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs a full exchange against postgres-protocol's client implementation.
    fn login(secret: &ScramSecret, password: &str) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let (exchange, server_first) = ScramExchange::start(secret, client.message())?;
        client
            .update(server_first.as_bytes())
            .expect("client accepts server-first");
        let server_final = exchange.finish(client.message())?;
        client
            .finish(server_final.as_bytes())
            .expect("client verifies the server");
        Ok(())
    }

    #[test]
    fn right_password_passes_and_server_is_verified() {
        let secret = ScramSecret::from_password("app-secret");
        assert_eq!(login(&secret, "app-secret"), Ok(()));
    }

    #[test]
    fn wrong_password_fails() {
        let secret = ScramSecret::from_password("app-secret");
        assert_eq!(login(&secret, "guess"), Err(ScramError::InvalidProof));
    }

    #[test]
    fn verifier_round_trip() {
        let s = ScramSecret::derive("pw", b"0123456789abcdef".to_vec(), 4096);
        let text = format!(
            "SCRAM-SHA-256$4096:{}${}:{}",
            B64.encode(&s.salt),
            B64.encode(s.stored_key),
            B64.encode(s.server_key)
        );
        let parsed = ScramSecret::parse_verifier(&text).unwrap();
        assert_eq!(login(&parsed, "pw"), Ok(()));
        assert!(ScramSecret::parse_verifier("md5abc").is_none());
        assert!(ScramSecret::parse_verifier("SCRAM-SHA-256$0:AA==$AA==:AA==").is_none());
    }

    #[test]
    fn malformed_messages_are_rejected() {
        let secret = ScramSecret::from_password("x");
        for bad in [
            &b""[..],
            b"n",
            b"n,,",
            b"x,,n=,r=abc",
            b"n,a=bob,n=,r=abc",
            b"n,,n=,r=",
            b"n,,m=1,n=,r=a",
            b"\xff\xfe",
        ] {
            assert!(ScramExchange::start(&secret, bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            ScramExchange::start(&secret, b"p=tls-server-end-point,,n=,r=abc").err(),
            Some(ScramError::ChannelBinding)
        );
        let (ex, _) = ScramExchange::start(&secret, b"n,,n=,r=abc").unwrap();
        assert!(ex.finish(b"c=biws,r=wrong,p=AAAA").is_err());
    }
}
