//! `${env:NAME}` in config values: secrets from the environment, resolved at start (and at
//! each check), never logged. Which keys take it is listed in docs/configuration.md.

/// A `${env:NAME}` that cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// The variable is not set (or not UTF-8).
    #[error("environment variable {0} is not set (referenced as ${{env:{0}}})")]
    Unset(String),
    /// `${env:` without its closing `}`.
    #[error("unterminated ${{env:...}} reference")]
    Unterminated,
}

/// Replaces every `${env:NAME}` in `text` with the variable's value.
pub fn substitute_env(text: &str) -> Result<String, EnvError> {
    substitute_with(text, |name| std::env::var(name).ok())
}

/// [`substitute_env`] with a lookup of its own (for tests).
fn substitute_with(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, EnvError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("${env:") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "${env:".len()..];
        let end = after.find('}').ok_or(EnvError::Unterminated)?;
        let name = &after[..end];
        let value = lookup(name).ok_or_else(|| EnvError::Unset(name.to_owned()))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_substitution() {
        let env = |n: &str| (n == "TOKEN").then(|| "s3cret".to_owned());
        assert_eq!(substitute_with("Bearer ${env:TOKEN}", env).unwrap(), "Bearer s3cret");
        assert_eq!(substitute_with("${env:TOKEN}${env:TOKEN}", env).unwrap(), "s3crets3cret");
        assert_eq!(substitute_with("plain", env).unwrap(), "plain");
        assert_eq!(substitute_with("${env:NOPE}", env), Err(EnvError::Unset("NOPE".into())));
        assert_eq!(substitute_with("${env:TOKEN", env), Err(EnvError::Unterminated));
        let msg = substitute_with("${env:NOPE}", env).unwrap_err().to_string();
        assert!(msg.contains("NOPE") && msg.contains("${env:NOPE}"), "{msg}");
    }
}
