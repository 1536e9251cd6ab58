//! Order numbers, matched against the pattern the operator configures.

use super::DomainError;
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The shape every order number must have, anchored at both ends.
#[derive(Debug, Clone)]
pub struct OrderPattern {
    source: String,
    regex: Regex,
}

impl OrderPattern {
    /// Compiles `pattern`; it always has to match the whole order number.
    pub fn new(pattern: &str) -> Result<Self, regex::Error> {
        let regex = Regex::new(&format!("^(?:{pattern})$"))?;
        Ok(Self {
            source: pattern.to_owned(),
            regex,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

/// An order number: trimmed, upper-cased and matching [`OrderPattern`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderNumber(String);

impl OrderNumber {
    pub fn parse(input: &str, pattern: &OrderPattern) -> Result<Self, DomainError> {
        let normalized = input.trim().to_uppercase();
        if normalized.is_empty() || !pattern.regex.is_match(&normalized) {
            return Err(DomainError::InvalidOrderNumber {
                input: input.to_owned(),
                pattern: pattern.source.clone(),
            });
        }
        Ok(Self(normalized))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrderNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern() -> OrderPattern {
        OrderPattern::new(r"[A-Z]{2}-\d{4,8}").unwrap()
    }

    #[test]
    fn an_order_number_is_trimmed_and_upper_cased() {
        let order = OrderNumber::parse("  ab-1001 ", &pattern()).unwrap();
        assert_eq!(order.as_str(), "AB-1001");
    }

    #[test]
    fn the_pattern_must_match_the_whole_order_number() {
        for bad in ["AB-1001x", "xAB-1001", "AB-12", "", "   ", "AB 1001"] {
            let err = OrderNumber::parse(bad, &pattern()).unwrap_err();
            assert!(
                matches!(err, DomainError::InvalidOrderNumber { .. }),
                "{bad}"
            );
        }
    }
}
