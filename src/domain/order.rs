//! Order numbers, matched against the pattern the operator configures.

use super::DomainError;
use super::update::printable;
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

/// An order number: trimmed, printable ASCII, upper-cased and matching [`OrderPattern`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderNumber(String);

impl OrderNumber {
    pub fn parse(input: &str, pattern: &OrderPattern) -> Result<Self, DomainError> {
        let trimmed = input.trim();
        // Refused before upper-casing and matching: Unicode upper-casing turns ß into SS and ﬀ
        // into FF, and a pattern's \d matches Arabic-Indic digits, so input nobody typed as
        // that order number would otherwise become one.
        let leading = input.chars().take_while(|c| c.is_whitespace()).count();
        if let Some((index, character)) = trimmed
            .chars()
            .enumerate()
            .find(|&(_, c)| !(c == ' ' || c.is_ascii_graphic()))
        {
            return Err(DomainError::InvalidOrderNumberCharacter {
                input: printable(input),
                character,
                position: leading + index + 1,
            });
        }
        let normalized = trimmed.to_ascii_uppercase();
        if normalized.is_empty() || !pattern.regex.is_match(&normalized) {
            return Err(DomainError::InvalidOrderNumber {
                input: printable(input),
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
    use super::super::update::hostile;
    use super::*;
    use proptest::prelude::*;

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

    #[test]
    fn unicode_case_mapping_cannot_make_an_order_number_of_other_characters() {
        for (bad, character) in [
            ("ß-1001", 'ß'),
            ("ﬀ-1001", 'ﬀ'),
            ("ıD-1001", 'ı'),
            ("AB-١٠٠١", '١'),
            ("AB-１００１", '１'),
        ] {
            let err = OrderNumber::parse(bad, &pattern()).unwrap_err();
            assert!(
                matches!(
                    err,
                    DomainError::InvalidOrderNumberCharacter { character: c, .. } if c == character
                ),
                "{bad}: {err:?}"
            );
        }
    }

    #[test]
    fn a_control_character_is_refused_even_where_the_pattern_would_take_it() {
        let anything = OrderPattern::new(r"[A-Z]{2}-.+").unwrap();
        let err = OrderNumber::parse("  ab-1\x1b[2J", &anything).unwrap_err();
        assert_eq!(
            err,
            DomainError::InvalidOrderNumberCharacter {
                input: "  ab-1\\u{1b}[2J".into(),
                character: '\x1b',
                position: 7
            }
        );
    }

    #[test]
    fn the_error_names_the_character_that_is_not_ascii_and_where_it_is() {
        let err = OrderNumber::parse("ß-1001", &pattern()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "'ß-1001' is not an order number: it contains 'ß' (U+00DF) at position 1; \
             order numbers are printable ASCII"
        );
    }

    const ORDERS: &[&str] = &[
        "AB-", "ab-", "Zz", "1001", "12345678", "-", " ", "ß", "ﬀ", "ı",
    ];

    proptest! {
        #![proptest_config(hostile::config())]

        #[test]
        fn a_parsed_order_number_is_printable_ascii_that_parses_to_itself(
            input in hostile::text(ORDERS)
        ) {
            // The second pattern takes anything, so only the parser's own rules stand between
            // hostile input and an order number.
            for pattern in [pattern(), OrderPattern::new(".+").unwrap()] {
                match OrderNumber::parse(&input, &pattern) {
                    Ok(order) => {
                        let text = order.as_str();
                        prop_assert!(text.chars().all(|c| c == ' ' || c.is_ascii_graphic()));
                        prop_assert!(!text.chars().any(|c| c.is_ascii_lowercase()));
                        prop_assert!(text == text.trim() && pattern.regex.is_match(text));
                        prop_assert_eq!(OrderNumber::parse(text, &pattern), Ok(order.clone()));
                    }
                    Err(err) => {
                        prop_assert!(matches!(
                            err,
                            DomainError::InvalidOrderNumber { .. }
                                | DomainError::InvalidOrderNumberCharacter { .. }
                        ), "{err:?}");
                        prop_assert!(!err.to_string().chars().any(char::is_control), "{err:?}");
                    }
                }
            }
        }
    }
}
