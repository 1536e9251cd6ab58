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
    /// An order number of this shape, shown in errors: support staff and customers read an
    /// example, not a regular expression.
    example: Option<String>,
}

impl OrderPattern {
    /// Compiles `pattern`; it always has to match the whole order number.
    pub fn new(pattern: &str) -> Result<Self, regex::Error> {
        let anchored = format!("^(?:{pattern})$");
        let regex = Regex::new(&anchored)?;
        let example = regex_syntax::parse(&anchored)
            .ok()
            .and_then(|hir| shortest_example(&hir))
            .filter(|example| regex.is_match(example));
        Ok(Self {
            source: pattern.to_owned(),
            regex,
            example,
        })
    }

    /// Shows `example` in errors instead of one made from the pattern; refused unless the
    /// pattern matches it.
    pub fn with_example(self, example: &str) -> Result<Self, String> {
        let example = example.trim();
        if !self.regex.is_match(example) {
            return Err(format!(
                "'{}' does not match orders.pattern",
                printable(example)
            ));
        }
        Ok(Self {
            example: Some(example.to_owned()),
            ..self
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `text`, exactly as given, has the shape of an order number.
    pub fn matches(&self, text: &str) -> bool {
        self.regex.is_match(text)
    }

    /// How an order number looks, for a message: "like AB-1001", or the pattern itself when
    /// no example could be made.
    pub fn looks_like(&self) -> String {
        match &self.example {
            Some(example) => format!("order numbers look like {example}"),
            None => format!("it must match {}", self.source),
        }
    }
}

/// The shortest text `hir` matches, made of printable ASCII: each repetition its least, each
/// alternation its first branch, each class its first printable character. None where no such
/// text exists or a repetition is too long to make an example of.
fn shortest_example(hir: &regex_syntax::hir::Hir) -> Option<String> {
    use regex_syntax::hir::{Class, HirKind};
    let mut out = String::new();
    let mut stack = vec![hir];
    while let Some(hir) = stack.pop() {
        match hir.kind() {
            HirKind::Empty | HirKind::Look(_) => {}
            HirKind::Literal(literal) => out.push_str(std::str::from_utf8(&literal.0).ok()?),
            HirKind::Class(Class::Unicode(class)) => out.push(
                class
                    .ranges()
                    .iter()
                    .flat_map(|range| range.start()..=range.end())
                    .take(256)
                    .find(char::is_ascii_alphanumeric)?,
            ),
            HirKind::Class(Class::Bytes(class)) => out.push(char::from(
                class
                    .ranges()
                    .iter()
                    .flat_map(|range| range.start()..=range.end())
                    .find(u8::is_ascii_alphanumeric)?,
            )),
            HirKind::Repetition(repetition) => {
                if repetition.min > 40 {
                    return None;
                }
                stack.extend(std::iter::repeat_n(
                    &*repetition.sub,
                    repetition.min as usize,
                ));
            }
            HirKind::Capture(capture) => stack.push(&capture.sub),
            HirKind::Concat(parts) => stack.extend(parts.iter().rev()),
            HirKind::Alternation(branches) => stack.push(branches.first()?),
        }
        if out.len() > 100 {
            return None;
        }
    }
    Some(out)
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
                looks_like: pattern.looks_like(),
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
    fn an_error_shows_an_example_order_number_not_the_pattern() {
        let err = OrderNumber::parse("nope", &pattern()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "'nope' is not an order number: order numbers look like AA-0000"
        );
        let default = OrderPattern::new("[A-Z]{2}-[0-9]{4,10}").unwrap();
        assert_eq!(default.looks_like(), "order numbers look like AA-0000");
        let chosen = default.with_example("ab-1001").unwrap_err();
        assert_eq!(chosen, "'ab-1001' does not match orders.pattern");
        let chosen = OrderPattern::new("[A-Z]{2}-[0-9]{4,10}")
            .unwrap()
            .with_example("AB-1001")
            .unwrap();
        assert_eq!(chosen.looks_like(), "order numbers look like AB-1001");
        for (pattern, example) in [
            ("ORD(ER)?-[0-9]+", "ORD-0"),
            ("(?i)[a-z]{3}[0-9]{2}", "AAA00"),
            ("[0-9]{6}|X-[A-F]{2}", "000000"),
            (r"\d{3}\.\d{3}", "000.000"),
        ] {
            let made = OrderPattern::new(pattern).unwrap();
            assert_eq!(made.example.as_deref(), Some(example), "{pattern}");
        }
        // Where no example can be made, the message falls back to the pattern.
        let unmakeable = OrderPattern::new("[0-9]{50}").unwrap();
        assert_eq!(unmakeable.looks_like(), "it must match [0-9]{50}");
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
