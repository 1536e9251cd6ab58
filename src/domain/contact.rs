//! Contacts: an email address (parsed by lettre) or an E.164 phone number.

use super::DomainError;
use super::update::{describe_char, printable};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// An email address lettre accepts, stored lower-cased so one mailbox is one subscriber.
///
/// Lower-casing the local part is technically lossy (RFC 5321 lets it be case-sensitive), but no
/// mail provider in practice treats `Ann@` and `ann@` as different people, and subscribing twice
/// would send two copies of every update.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EmailAddress(lettre::Address);

impl EmailAddress {
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        let normalized = input.trim().to_lowercase();
        let invalid = |reason: String| DomainError::InvalidEmail {
            input: input.to_owned(),
            reason,
        };
        if normalized.len() > 254 {
            return Err(invalid("it is longer than 254 characters".into()));
        }
        let address = lettre::Address::from_str(&normalized).map_err(|e| invalid(e.to_string()))?;
        if !address.domain().contains('.') && address.domain() != "localhost" {
            return Err(invalid("the domain has no dot".into()));
        }
        Ok(Self(address))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_ref()
    }

    pub fn address(&self) -> &lettre::Address {
        &self.0
    }
}

/// A phone number in E.164 form, validated against the numbering plan of its country.
///
/// Only ASCII digits, with spaces, dashes, dots, slashes and brackets between them, are read:
/// the phonenumber crate would also turn letters into digits (+1 800 FLOWERS) and drop an
/// extension without a word, and neither reaches a phone by text message.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        let invalid = |reason: String| DomainError::InvalidPhone {
            input: printable(input),
            reason,
        };
        let Some(rest) = input.trim().strip_prefix('+') else {
            return Err(invalid("it must start with + and the country code".into()));
        };
        let compact: String = rest
            .chars()
            .filter(|c| {
                !matches!(
                    c,
                    ' ' | '\u{a0}' | '\u{2009}' | '\u{202f}' | '-' | '.' | '/'
                )
            })
            .collect();
        // "(0)" is the trunk prefix, dialled only from inside the country: "+44 (0) 7700 900123"
        // is the common UK way of writing +44 7700 900123.
        let compact = compact.replacen("(0)", "", 1);
        let mut e164 = String::from("+");
        for (index, c) in compact.char_indices() {
            match c {
                '0'..='9' => e164.push(c),
                '(' | ')' => {}
                _ => return Err(invalid(not_a_digit(&compact[index..], c))),
            }
        }
        let parsed = phonenumber::parse(None, &e164).map_err(|e| invalid(e.to_string()))?;
        if !has_possible_length(&parsed) {
            return Err(invalid(
                "it has the wrong number of digits for its country".into(),
            ));
        }
        Ok(Self(
            parsed.format().mode(phonenumber::Mode::E164).to_string(),
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why `rest`, which starts with the character `c` where a digit should be, is no phone number.
fn not_a_digit(rest: &str, c: char) -> String {
    // The ways an extension is written: ext. 5, extension 5, x5, #5, ;ext=5 (RFC 3966), and the
    // comma a dialler reads as "pause, then dial 5".
    let extension = matches!(c, 'x' | 'X' | '#' | ';' | ',')
        || rest
            .get(..3)
            .is_some_and(|start| start.eq_ignore_ascii_case("ext"));
    if extension {
        "it has an extension, and a text message cannot reach an extension".into()
    } else if c.is_alphabetic() {
        "it contains letters; write the number in digits".into()
    } else {
        format!("it contains {} where a digit should be", describe_char(c))
    }
}

/// Whether the national number has a length its country's numbering plan allows.
///
/// This is deliberately looser than `phonenumber::is_valid`, which also demands an assigned
/// range: ranges reserved for drama and testing (the UK's 07700 900xxx) fail that, and the
/// SMS gateway is the authority on whether a number exists. Length catches the typos.
fn has_possible_length(number: &phonenumber::PhoneNumber) -> bool {
    let digits = number.national().to_string().len() as u16;
    let Some(plans) = phonenumber::metadata::DATABASE.by_code(&number.code().value()) else {
        return false;
    };
    plans.iter().any(|plan| {
        let kinds = plan.descriptors();
        // The general descriptor's lengths are often left empty in the metadata; the lengths
        // of the kinds of number (mobile, fixed line…) are the ones filled in.
        [
            Some(kinds.general()),
            kinds.mobile(),
            kinds.fixed_line(),
            kinds.toll_free(),
            kinds.premium_rate(),
            kinds.shared_cost(),
            kinds.personal_number(),
            kinds.voip(),
            kinds.pager(),
            kinds.uan(),
        ]
        .into_iter()
        .flatten()
        .any(|kind| kind.possible_length().contains(&digits))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContactKind {
    Email,
    Phone,
}

/// Where a subscriber is reached. Its canonical string is also its key in the store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Contact {
    Email(EmailAddress),
    Phone(PhoneNumber),
}

impl Contact {
    /// Parses either form: a leading `+` means a phone number.
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        if input.trim_start().starts_with('+') {
            PhoneNumber::parse(input).map(Contact::Phone)
        } else {
            EmailAddress::parse(input).map(Contact::Email)
        }
    }

    pub fn kind(&self) -> ContactKind {
        match self {
            Contact::Email(_) => ContactKind::Email,
            Contact::Phone(_) => ContactKind::Phone,
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Contact::Email(email) => email.as_str(),
            Contact::Phone(phone) => phone.as_str(),
        }
    }

    pub fn email(&self) -> Option<&EmailAddress> {
        match self {
            Contact::Email(email) => Some(email),
            Contact::Phone(_) => None,
        }
    }
}

impl fmt::Display for Contact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Contact {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Contact {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Contact::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_email_address_is_trimmed_and_lower_cased() {
        let contact = Contact::parse("  Ann@Example.COM ").unwrap();
        assert_eq!(contact.as_str(), "ann@example.com");
        assert_eq!(contact.kind(), ContactKind::Email);
    }

    #[test]
    fn malformed_email_addresses_are_rejected() {
        for bad in [
            "ann",
            "ann@",
            "@example.com",
            "ann@@example.com",
            "Ann <ann@example.com>",
            "ann@example",
        ] {
            assert!(
                matches!(
                    EmailAddress::parse(bad),
                    Err(DomainError::InvalidEmail { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_phone_number_is_normalized_to_e164() {
        let contact = Contact::parse("+44 7700 900123").unwrap();
        assert_eq!(contact.as_str(), "+447700900123");
        assert_eq!(contact.kind(), ContactKind::Phone);
    }

    #[test]
    fn a_uk_number_written_with_its_trunk_prefix_in_brackets_is_accepted() {
        for written in [
            "+44 (0) 7700 900123",
            "+44(0)7700900123",
            "+44 (0)7700-900-123",
            "+44 ( 0 ) 7700 900123",
        ] {
            assert_eq!(
                PhoneNumber::parse(written).map(|p| p.as_str().to_owned()),
                Ok("+447700900123".to_owned()),
                "{written}"
            );
        }
    }

    fn reason(input: &str) -> String {
        match PhoneNumber::parse(input) {
            Err(DomainError::InvalidPhone { reason, .. }) => reason,
            other => panic!("{input}: {other:?}"),
        }
    }

    #[test]
    fn a_number_with_an_extension_is_refused_as_a_text_cannot_reach_it() {
        for written in [
            "+44 7700 900123 ext. 5",
            "+44 7700 900123 EXT 5",
            "+44 7700 900123 extension 5",
            "+44 7700 900123 x5",
            "+44 7700 900123 X 5",
            "+44 7700 900123;ext=5",
            "+44 7700 900123 #5",
            "+44 7700 900123,5",
        ] {
            assert_eq!(
                reason(written),
                "it has an extension, and a text message cannot reach an extension",
                "{written}"
            );
        }
    }

    #[test]
    fn letters_in_a_phone_number_are_refused() {
        for written in ["+1 800 FLOWERS", "+44 7700 9OO123", "+44a7700900123"] {
            assert_eq!(
                reason(written),
                "it contains letters; write the number in digits",
                "{written}"
            );
        }
    }

    #[test]
    fn a_phone_number_is_read_in_ascii_digits_only() {
        assert_eq!(
            reason("+44 7700 90012\u{663}"),
            "it contains '\u{663}' (U+0663) where a digit should be"
        );
        assert_eq!(
            reason("+44 7700\x1b900123"),
            "it contains a control character (U+001B) where a digit should be"
        );
        assert_eq!(
            reason("+44 7700 900123 +1"),
            "it contains '+' (U+002B) where a digit should be"
        );
    }

    #[test]
    fn malformed_phone_numbers_are_rejected() {
        for bad in ["+44", "+4477009001234567", "+999123", "+44abc"] {
            assert!(
                matches!(
                    PhoneNumber::parse(bad),
                    Err(DomainError::InvalidPhone { .. })
                ),
                "{bad}"
            );
        }
        assert!(PhoneNumber::parse("07700900123").is_err());
    }
}
