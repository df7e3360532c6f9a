//! Who may do what on the console: the two tokens, the sessions derived from them, and the
//! check every request passes before it reaches a page or the API.
//!
//! `BATCHQ_UI_TOKEN` may do everything; `BATCHQ_UI_READ_TOKEN` (only beside it) may read every
//! page and every `GET` of the API and change nothing. Pages take either token as a bearer
//! token or as the session cookie the login form sets; the API takes a bearer token only, so a
//! browser never sends an API request's credentials on its own and the API needs no CSRF token.

use anyhow::bail;
use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The value `deploy/kubernetes/secret-console.yaml` ships, for the operator to replace.
pub(crate) const PLACEHOLDER_TOKEN: &str = "CHANGE-ME-to-a-long-random-secret";
/// Fewest characters of a token: `openssl rand -hex 24` makes 48.
pub(crate) const MIN_TOKEN_CHARS: usize = 32;
pub(crate) const SESSION_COOKIE: &str = "batchq_session";

/// What a request's credentials allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// No credentials, or wrong ones (while a token is set).
    Denied,
    /// The read token: pages and `GET`s, no `POST` but the login itself.
    Read,
    /// The token, or no token configured at all.
    Full,
}

/// The console's secrets, checked at start.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tokens {
    full: Option<String>,
    read: Option<String>,
}

impl Tokens {
    /// The tokens as set, refusing an empty one, the shipped placeholder, one shorter than
    /// [`MIN_TOKEN_CHARS`], a read token without a token, and a read token equal to it.
    pub(crate) fn checked(full: Option<String>, read: Option<String>) -> anyhow::Result<Self> {
        check_token("BATCHQ_UI_TOKEN", full.as_deref())?;
        check_token("BATCHQ_UI_READ_TOKEN", read.as_deref())?;
        if read.is_some() && full.is_none() {
            bail!(
                "BATCHQ_UI_READ_TOKEN is set without BATCHQ_UI_TOKEN: the read token is a second \
                 token beside the one that may change things; set BATCHQ_UI_TOKEN too"
            );
        }
        if read.is_some() && read == full {
            bail!("BATCHQ_UI_READ_TOKEN equals BATCHQ_UI_TOKEN: give the read token its own value");
        }
        Ok(Self { full, read })
    }

    pub(crate) fn is_set(&self) -> bool {
        self.full.is_some()
    }

    /// What `given` (a bearer token or a login form's field) allows.
    pub(crate) fn access_of(&self, given: &str) -> Access {
        if self.full.as_deref().is_some_and(|t| same(given, t)) {
            Access::Full
        } else if self.read.as_deref().is_some_and(|t| same(given, t)) {
            Access::Read
        } else {
            Access::Denied
        }
    }

    /// The session cookie's value for `access`: derived from its token, so it survives restarts
    /// and is the same on every replica of the console; useless without knowing the token.
    pub(crate) fn session(&self, access: Access) -> Option<String> {
        match access {
            Access::Full => self.full.as_deref().map(|t| derive("session", t)),
            Access::Read => self.read.as_deref().map(|t| derive("read session", t)),
            Access::Denied => None,
        }
    }

    /// The CSRF token in every form: derived from the token when there is one (the same on
    /// every replica), else random per process.
    pub(crate) fn csrf(&self) -> String {
        match &self.full {
            Some(token) => derive("csrf", token),
            None => hex::encode(rand::random::<[u8; 16]>()),
        }
    }

    /// What a request may do: with `api`, from its bearer token only; else from its bearer
    /// token or its session cookie.
    pub(crate) fn access(&self, headers: &HeaderMap, api: bool) -> Access {
        if !self.is_set() {
            return Access::Full;
        }
        // The scheme's name is case-insensitive (RFC 9110).
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim_start().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token);
        if let Some(bearer) = bearer {
            let access = self.access_of(bearer.trim());
            if access != Access::Denied || api {
                return access;
            }
        }
        if api {
            return Access::Denied;
        }
        let Some(cookie) = cookie(headers, SESSION_COOKIE) else {
            return Access::Denied;
        };
        [Access::Full, Access::Read]
            .into_iter()
            .find(|&access| self.session(access).is_some_and(|s| same(&cookie, &s)))
            .unwrap_or(Access::Denied)
    }
}

fn check_token(variable: &str, token: Option<&str>) -> anyhow::Result<()> {
    let Some(token) = token else {
        return Ok(());
    };
    if token.is_empty() {
        bail!("{variable} is set but empty");
    }
    if token.trim() == PLACEHOLDER_TOKEN {
        bail!(
            "{variable} is the placeholder {PLACEHOLDER_TOKEN:?} that deploy/kubernetes ships; \
             set it to a long random secret (openssl rand -hex 24)"
        );
    }
    let chars = token.chars().count();
    if chars < MIN_TOKEN_CHARS {
        bail!(
            "{variable} has {chars} characters, fewer than the {MIN_TOKEN_CHARS} a console token \
             needs; use a long random secret (openssl rand -hex 24)"
        );
    }
    Ok(())
}

fn derive(purpose: &str, token: &str) -> String {
    hex::encode(Sha256::digest(format!("batchq console {purpose}\0{token}")))
}

/// Compares secrets in time that does not depend on where they differ.
pub(crate) fn same(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

pub(crate) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    const FULL: &str = "0123456789abcdef0123456789abcdef";
    const READ: &str = "fedcba9876543210fedcba9876543210";

    fn tokens() -> Tokens {
        Tokens::checked(Some(FULL.into()), Some(READ.into())).expect("valid tokens")
    }

    fn error_of(full: Option<&str>, read: Option<&str>) -> String {
        Tokens::checked(full.map(str::to_owned), read.map(str::to_owned))
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn weak_tokens_are_refused_naming_the_variable() {
        let placeholder = error_of(Some(PLACEHOLDER_TOKEN), None);
        assert!(placeholder.contains("BATCHQ_UI_TOKEN") && placeholder.contains("placeholder"));
        let short = error_of(Some(FULL), Some("short-read-token"));
        assert!(
            short.contains("BATCHQ_UI_READ_TOKEN") && short.contains("16 characters"),
            "{short}"
        );
        assert!(error_of(Some(&FULL[..31]), None).contains("31 characters"));
        assert!(error_of(Some(""), None).contains("empty"));
        assert!(error_of(None, Some(READ)).contains("without BATCHQ_UI_TOKEN"));
        assert!(error_of(Some(FULL), Some(FULL)).contains("equals"));
        assert!(Tokens::checked(Some(FULL.into()), None).is_ok());
        assert!(Tokens::checked(None, None).is_ok());
    }

    #[test]
    fn the_api_takes_bearer_tokens_only() {
        let tokens = tokens();
        let mut headers = HeaderMap::new();
        assert_eq!(tokens.access(&headers, true), Access::Denied);
        let session = tokens.session(Access::Full).expect("a session");
        let cookie = format!("{SESSION_COOKIE}={session}");
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&cookie).expect("ascii"),
        );
        assert_eq!(tokens.access(&headers, false), Access::Full);
        assert_eq!(tokens.access(&headers, true), Access::Denied);
        let bearer = format!("bearer {READ}");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&bearer).expect("ascii"),
        );
        assert_eq!(tokens.access(&headers, true), Access::Read);
        assert_eq!(
            Tokens::default().access(&HeaderMap::new(), true),
            Access::Full
        );
    }

    #[test]
    fn each_token_has_its_own_session() {
        let tokens = tokens();
        let mut headers = HeaderMap::new();
        let read = tokens.session(Access::Read).expect("a read session");
        assert_ne!(Some(&read), tokens.session(Access::Full).as_ref());
        let cookie = format!("a=1; {SESSION_COOKIE}={read}");
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&cookie).expect("ascii"),
        );
        assert_eq!(tokens.access(&headers, false), Access::Read);
        assert_eq!(tokens.access_of("nope"), Access::Denied);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        assert!(!same("", "a"));
    }

    #[test]
    fn the_session_cookie_is_read_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; batchq_session=s3cr3t; b=2"),
        );
        assert_eq!(cookie(&headers, SESSION_COOKIE).as_deref(), Some("s3cr3t"));
        assert_eq!(cookie(&headers, "c"), None);
    }
}
